//! A file or folder of ordinary Kubernetes YAML (or JSON): Service,
//! EndpointSlice and Endpoints objects, multi-document files and `*List`
//! kinds. Each bad file or object is reported with its file, name and
//! reason; everything else is kept.
//!
//! There is no EndpointSlice controller here, so Endpoints objects are
//! mirrored into slices the way Kubernetes' mirroring controller does for
//! selector-less Services, whatever the Service's selector.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};

use k8s_openapi::{
    Metadata, Resource,
    api::{
        core::v1::Endpoints,
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use notify::{RecursiveMode, Watcher as _};
use serde::{Deserialize as _, de::DeserializeOwned};
use serde_yaml_ng::Value;
use tokio::sync::mpsc;

use crate::model::{ClusterState, LABEL_SERVICE_NAME, object_ref};

/// A problem in the manifests, located.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ManifestError {
    pub file: PathBuf,
    /// `Kind namespace/name` when the object got that far.
    pub object: Option<String>,
    pub reason: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.object {
            Some(o) => write!(f, "{}: {o}: {}", self.file.display(), self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

/// What a load found: the objects that parsed, and what did not.
#[derive(Debug, Default)]
pub struct Loaded {
    pub state: ClusterState,
    pub errors: Vec<ManifestError>,
}

/// The manifest files under `path` (itself, if it is a file), sorted.
pub fn manifest_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        if p.is_file() && is_manifest(&p) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Whether a file in a manifests folder is read: `.yaml`, `.yml`, `.json`.
pub fn is_manifest(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

/// Reads every manifest under `path` once.
pub fn load(path: &Path) -> Loaded {
    let mut folder = Folder::new(path);
    let (state, errors) = folder.refresh();
    Loaded { state: state.clone(), errors }
}

/// Parses one file's documents into `loaded`.
pub fn parse_into(file: &Path, text: &str, loaded: &mut Loaded) {
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let err = |object: Option<String>, reason: String| ManifestError {
            file: file.to_path_buf(),
            object,
            reason,
        };
        match Value::deserialize(doc) {
            Ok(Value::Null) => {}
            Ok(v) => add_object(v, &mut |o, r| loaded.errors.push(err(o, r)), &mut loaded.state),
            Err(e) => {
                loaded.errors.push(err(None, format!("document {}: not valid YAML: {e}", i + 1)));
                // The parser cannot resynchronise after a syntax error.
                break;
            }
        }
    }
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn describe(v: &Value, kind: &str) -> String {
    let meta = v.get("metadata");
    let name = meta.and_then(|m| str_field(m, "name")).unwrap_or("<unnamed>");
    let ns = meta.and_then(|m| str_field(m, "namespace")).unwrap_or("default");
    format!("{kind} {ns}/{name}")
}

fn add_object(v: Value, report: &mut dyn FnMut(Option<String>, String), state: &mut ClusterState) {
    let Some(kind) = str_field(&v, "kind").map(str::to_owned) else {
        report(None, "document without a kind: ignored".into());
        return;
    };
    let what = describe(&v, &kind);
    if kind.ends_with("List") {
        match v.get("items").and_then(Value::as_sequence) {
            Some(items) => items.iter().cloned().for_each(|item| add_object(item, report, state)),
            None => report(Some(what), "a List without items".into()),
        }
        return;
    }
    let named = |meta: &ObjectMeta| meta.name.as_deref().is_some_and(|n| !n.is_empty());
    match kind.as_str() {
        "Service" => insert(v, what, &mut state.services, report),
        "EndpointSlice" => insert(v, what, &mut state.slices, report),
        "Endpoints" => match serde_yaml_ng::from_value::<Endpoints>(v) {
            Ok(ep) if named(&ep.metadata) => {
                for slice in mirror(&ep) {
                    state.slices.insert(object_ref(&slice.metadata), Arc::new(slice));
                }
            }
            Ok(_) => report(Some(what), "metadata.name is missing".into()),
            Err(e) => report(Some(what), format!("not valid Endpoints: {e}")),
        },
        // Other kinds (Deployments, ConfigMaps...) may share the folder.
        _ => {}
    }
}

/// Parses `v` as a `T` and files it under its `namespace/name`.
fn insert<T>(
    v: Value,
    what: String,
    into: &mut BTreeMap<String, Arc<T>>,
    report: &mut dyn FnMut(Option<String>, String),
) where
    T: DeserializeOwned + Resource + Metadata<Ty = ObjectMeta>,
{
    match serde_yaml_ng::from_value::<T>(v) {
        Ok(mut obj) if obj.metadata().name.as_deref().is_some_and(|n| !n.is_empty()) => {
            obj.metadata_mut().namespace.get_or_insert_with(|| "default".into());
            if into.insert(object_ref(obj.metadata()), Arc::new(obj)).is_some() {
                report(Some(what), "defined twice: the later definition wins".into());
            }
        }
        Ok(_) => report(Some(what), "metadata.name is missing".into()),
        Err(e) => report(Some(what), format!("not a valid {}: {e}", T::KIND)),
    }
}

/// EndpointSlices for an Endpoints object, one per subset and address
/// family, as the EndpointSlice mirroring controller makes them.
pub fn mirror(ep: &Endpoints) -> Vec<EndpointSlice> {
    let ns = ep.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = ep.metadata.name.clone().unwrap_or_default();
    let mut slices = Vec::new();
    for (i, subset) in ep.subsets.iter().flatten().enumerate() {
        let ports: Vec<EndpointPort> = subset
            .ports
            .iter()
            .flatten()
            .map(|p| EndpointPort {
                name: p.name.clone(),
                port: Some(p.port),
                protocol: p.protocol.clone(),
                app_protocol: p.app_protocol.clone(),
            })
            .collect();
        let mut by_family: BTreeMap<&str, Vec<Endpoint>> = BTreeMap::new();
        let addresses = subset.addresses.iter().flatten().map(|a| (a, true));
        let not_ready = subset.not_ready_addresses.iter().flatten().map(|a| (a, false));
        for (addr, ready) in addresses.chain(not_ready) {
            let family = if addr.ip.contains(':') { "IPv6" } else { "IPv4" };
            by_family.entry(family).or_default().push(Endpoint {
                addresses: vec![addr.ip.clone()],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    serving: Some(ready),
                    terminating: Some(false),
                }),
                hostname: addr.hostname.clone(),
                node_name: addr.node_name.clone(),
                target_ref: addr.target_ref.clone(),
                ..Default::default()
            });
        }
        for (family, endpoints) in by_family {
            slices.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-mirror-{}-{}", i, family.to_lowercase())),
                    namespace: Some(ns.clone()),
                    labels: Some([(LABEL_SERVICE_NAME.to_string(), name.clone())].into()),
                    ..Default::default()
                },
                address_type: family.to_string(),
                endpoints,
                ports: Some(ports.clone()),
            });
        }
    }
    slices
}

/// A manifests folder kept in memory: only files whose size or mtime
/// changed are parsed again, and the merged state is updated in place, so
/// a change to one file costs that file, not the whole folder.
#[derive(Debug, Default)]
pub struct Folder {
    path: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    state: ClusterState,
}

#[derive(Debug)]
struct FileEntry {
    stamp: (std::time::SystemTime, u64),
    services: Vec<String>,
    slices: Vec<String>,
    errors: Vec<ManifestError>,
}

impl Folder {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf(), ..Default::default() }
    }

    /// Re-reads what changed; returns the merged state and every current error.
    pub fn refresh(&mut self) -> (&ClusterState, Vec<ManifestError>) {
        let mut errors = Vec::new();
        let files = match manifest_files(&self.path) {
            Ok(files) => files,
            Err(e) => {
                errors.push(ManifestError {
                    file: self.path.clone(),
                    object: None,
                    reason: format!("cannot list manifests: {e}"),
                });
                Vec::new()
            }
        };
        let gone: Vec<PathBuf> = self.files.keys().filter(|f| !files.contains(f)).cloned().collect();
        for file in gone {
            self.forget(&file);
        }
        for file in files {
            let stamp = std::fs::metadata(&file).and_then(|m| Ok((m.modified()?, m.len())));
            let Ok(stamp) = stamp else { continue };
            if self.files.get(&file).is_some_and(|e| e.stamp == stamp) {
                continue;
            }
            self.forget(&file);
            let mut loaded = Loaded::default();
            match std::fs::read_to_string(&file) {
                Ok(text) => parse_into(&file, &text, &mut loaded),
                Err(e) => loaded.errors.push(ManifestError {
                    file: file.clone(),
                    object: None,
                    reason: format!("cannot read: {e}"),
                }),
            }
            let entry = FileEntry {
                stamp,
                services: loaded.state.services.keys().cloned().collect(),
                slices: loaded.state.slices.keys().cloned().collect(),
                errors: loaded.errors,
            };
            self.state.services.extend(loaded.state.services);
            self.state.slices.extend(loaded.state.slices);
            self.files.insert(file, entry);
        }
        for entry in self.files.values() {
            errors.extend(entry.errors.iter().cloned());
        }
        (&self.state, errors)
    }

    fn forget(&mut self, file: &Path) {
        if let Some(old) = self.files.remove(file) {
            for k in old.services {
                self.state.services.remove(&k);
            }
            for k in old.slices {
                self.state.slices.remove(&k);
            }
        }
    }
}

/// How long a manifest being written may stay open before it is read anyway.
const SETTLE: Duration = Duration::from_millis(50);

/// Follows the manifests at `path` until dropped: signals `changed` once
/// they should be read again. A manifest closed after writing, renamed into
/// place or removed is read at once; one that is being written, once it is
/// closed or after `SETTLE` for writers that keep it open.
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
}

impl Watch {
    pub fn start(path: &Path, changed: mpsc::Sender<()>) -> Result<Self> {
        use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
        let (now_tx, mut now_rx) = mpsc::channel::<()>(1);
        let (settling_tx, mut settling_rx) = mpsc::channel::<()>(1);
        let single = path.is_file().then(|| path.to_path_buf());
        let watched = path.to_path_buf();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            // Editors' swap files and writers' temporary files do not count;
            // the folder itself (removed, renamed) does.
            let ours = |p: &PathBuf| {
                *p == watched
                    || match &single {
                        Some(file) => p == file,
                        None => is_manifest(p),
                    }
            };
            if !event.paths.iter().any(ours) {
                return;
            }
            let _ = match event.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Modify(ModifyKind::Name(_))
                | EventKind::Remove(_) => now_tx.try_send(()),
                EventKind::Access(_) => return,
                _ => settling_tx.try_send(()),
            };
        })?;
        // Editors replace files by renaming: watch the folder, not the file.
        let dir = if path.is_dir() { path } else { path.parent().unwrap_or(Path::new(".")) };
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", dir.display()))?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(()) = now_rx.recv() => {}
                    Some(()) = settling_rx.recv() => {
                        tokio::select! {
                            Some(()) = now_rx.recv() => {}
                            _ = tokio::time::sleep(SETTLE) => {}
                        }
                    }
                    else => return,
                }
                while now_rx.try_recv().is_ok() || settling_rx.try_recv().is_ok() {}
                if changed.send(()).await.is_err() {
                    return;
                }
            }
        });
        Ok(Self { _watcher: watcher })
    }
}
