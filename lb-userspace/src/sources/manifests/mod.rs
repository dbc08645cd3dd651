//! A file or folder of ordinary Kubernetes YAML (or JSON): Service,
//! EndpointSlice and Endpoints objects, multi-document files and `*List`
//! kinds. Each bad file or object is reported with its file, name and
//! reason; everything else is kept.
//!
//! There is no EndpointSlice controller here, so Endpoints objects are
//! mirrored into slices the way Kubernetes' mirroring controller does for
//! selector-less Services, whatever the Service's selector.
//!
//! Nothing is lost to a bad moment: a folder that cannot be listed keeps its
//! last state, a file that does not parse to its end (half written, or
//! broken) keeps the objects it held before, and an object two files define
//! comes from the first file by name, with the clash reported.

pub(crate) mod parse;
mod watch;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    io::Read as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

pub use self::{
    parse::{mirror, parse_into},
    watch::Watch,
};
use crate::model::{ClusterState, ObjectRef};

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
    if std::fs::metadata(path)?.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        // Hidden names are a ConfigMap volume's internals (`..data`) and
        // editors' files.
        let hidden = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if !hidden && is_manifest(&p) {
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

/// Reads every manifest under `path` once; an error if the folder itself
/// cannot be read.
pub fn load(path: &Path) -> anyhow::Result<Loaded> {
    let mut folder = Folder::new(path);
    let (_, errors) = folder.refresh();
    if let Some(e) = &folder.unlisted {
        anyhow::bail!("{}: {e}", path.display());
    }
    Ok(Loaded { state: folder.state, errors })
}

/// Limits on what a manifests folder may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Larger files are reported and not read: parsing YAML takes many
    /// times a file's size in memory.
    pub max_file_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_file_bytes: 16 << 20 }
    }
}

/// A file is read once it has been left alone this long (or closed):
/// until then it may be half written.
const SETTLED: Duration = Duration::from_millis(50);

/// A manifests folder kept in memory: only files whose stamp changed are
/// parsed again, and the merged state is updated in place, so a change to
/// one file costs that file, not the whole folder.
#[derive(Debug, Default)]
pub struct Folder {
    path: PathBuf,
    limits: Limits,
    files: BTreeMap<PathBuf, FileEntry>,
    state: ClusterState,
    /// Objects two or more files define: the first file's is used.
    contested: BTreeMap<Key, Vec<PathBuf>>,
    /// Why the folder could not be listed (its last state is kept).
    unlisted: Option<String>,
    /// A file was left half read, or unlisted: read again soon.
    retry: bool,
}

/// An object of the merged state.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Service(ObjectRef),
    Slice(ObjectRef),
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Service(name) => write!(f, "Service {name}"),
            Key::Slice(name) => write!(f, "EndpointSlice {name}"),
        }
    }
}

/// (mtime, size, device, inode): a ConfigMap's swap of `..data` changes
/// the inode a manifest's link leads to.
type Stamp = (SystemTime, u64, u64, u64);

#[derive(Debug, Default)]
struct FileEntry {
    stamp: Option<Stamp>,
    services: BTreeMap<ObjectRef, Arc<Service>>,
    slices: BTreeMap<ObjectRef, Arc<EndpointSlice>>,
    errors: Vec<ManifestError>,
}

impl FileEntry {
    fn keys(&self) -> impl Iterator<Item = Key> + '_ {
        let services = self.services.keys().cloned().map(Key::Service);
        services.chain(self.slices.keys().cloned().map(Key::Slice))
    }

    fn has(&self, key: &Key) -> bool {
        match key {
            Key::Service(name) => self.services.contains_key(name),
            Key::Slice(name) => self.slices.contains_key(name),
        }
    }
}

impl Folder {
    pub fn new(path: &Path) -> Self {
        Self::with_limits(path, Limits::default())
    }

    pub fn with_limits(path: &Path, limits: Limits) -> Self {
        Self { path: path.to_path_buf(), limits, ..Default::default() }
    }

    /// The merged state of the last refresh.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// Whether something should be read again soon though no event may come:
    /// a file still being written, or a folder that could not be listed.
    pub fn retry_soon(&self) -> bool {
        self.retry
    }

    /// The file the object `kind namespace/name` comes from.
    pub fn file_of(&self, kind: &str, name: &str) -> Option<&Path> {
        let key = match kind {
            "Service" => Key::Service(name.to_string()),
            "EndpointSlice" => Key::Slice(name.to_string()),
            _ => return None,
        };
        self.files.iter().find(|(_, e)| e.has(&key)).map(|(f, _)| f.as_path())
    }

    /// Re-reads what changed; returns the merged state and every current error.
    pub fn refresh(&mut self) -> (&ClusterState, Vec<ManifestError>) {
        self.refresh_with(false)
    }

    /// `refresh`, when no writer is known to be done (a settle timeout):
    /// files changed in the last moments may be half written and wait.
    pub fn refresh_wary(&mut self) -> (&ClusterState, Vec<ManifestError>) {
        self.refresh_with(true)
    }

    fn refresh_with(&mut self, wary: bool) -> (&ClusterState, Vec<ManifestError>) {
        self.retry = false;
        let mut dirty = BTreeSet::new();
        match manifest_files(&self.path) {
            Err(e) => {
                self.unlisted = Some(format!("cannot list manifests: {e}"));
                self.retry = true;
            }
            Ok(files) => {
                self.unlisted = None;
                let gone: Vec<PathBuf> = self.files.keys().filter(|f| !files.contains(f)).cloned().collect();
                for file in gone {
                    dirty.extend(
                        self.files.remove(&file).into_iter().flat_map(|e| e.keys().collect::<Vec<_>>()),
                    );
                }
                for file in files {
                    self.read(&file, wary, &mut dirty);
                }
            }
        }
        for key in dirty {
            self.merge(key);
        }
        (&self.state, self.errors())
    }

    /// Reads `file` again if it changed (and, `wary`, has settled).
    fn read(&mut self, file: &Path, wary: bool, dirty: &mut BTreeSet<Key>) {
        let entry = self.files.entry(file.to_path_buf()).or_default();
        let error = |reason: String| ManifestError { file: file.to_path_buf(), object: None, reason };
        let meta = match std::fs::metadata(file) {
            Ok(m) => m,
            Err(e) => {
                // A symlink loop, or a link whose target is gone (a swap in
                // progress): what it held before stays.
                entry.errors = vec![error(format!("cannot read: {e}"))];
                entry.stamp = None;
                return;
            }
        };
        if !meta.is_file() {
            dirty.extend(entry.keys());
            *entry = FileEntry {
                errors: vec![error("not a regular file (a FIFO, device or folder): not read".into())],
                ..Default::default()
            };
            return;
        }
        let max = self.limits.max_file_bytes;
        if meta.len() > max {
            entry.errors = vec![error(format!(
                "{} bytes, more than the limit of {max} (--max-manifest-bytes): not read{}",
                meta.len(),
                kept(entry)
            ))];
            entry.stamp = None;
            return;
        }
        let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len(), meta.dev(), meta.ino());
        if entry.stamp == Some(stamp) {
            return;
        }
        if wary && SystemTime::now().duration_since(stamp.0).is_ok_and(|age| age < SETTLED) {
            // Just written: maybe still being written. Soon.
            self.retry = true;
            return;
        }
        let mut text = String::new();
        let read = std::fs::File::open(file).and_then(|f| f.take(max + 1).read_to_string(&mut text));
        let mut loaded = Loaded::default();
        let complete = match read {
            Ok(_) if text.len() as u64 > max => {
                loaded.errors.push(error(format!("grew past the limit of {max} bytes while read: not read")));
                false
            }
            Ok(_) => parse_into(file, &text, &mut loaded),
            Err(e) => {
                loaded.errors.push(error(format!("cannot read: {e}")));
                false
            }
        };
        entry.stamp = Some(stamp);
        if complete {
            dirty.extend(entry.keys());
            entry.services = loaded.state.services;
            entry.slices = loaded.state.slices;
            dirty.extend(entry.keys());
        } else if !entry.services.is_empty() || !entry.slices.is_empty() {
            let note = format!("does not parse to its end{}", kept(entry));
            loaded.errors.push(error(note));
        }
        entry.errors = loaded.errors;
    }

    /// Sets `key` in the merged state from the first file defining it.
    fn merge(&mut self, key: Key) {
        let defining: Vec<&PathBuf> =
            self.files.iter().filter(|(_, e)| e.has(&key)).map(|(f, _)| f).collect();
        if defining.len() > 1 {
            self.contested.insert(key.clone(), defining.iter().map(|f| (*f).clone()).collect());
        } else {
            self.contested.remove(&key);
        }
        let winner = defining.first().map(|f| &self.files[*f]);
        match &key {
            Key::Service(name) => match winner.and_then(|e| e.services.get(name)) {
                Some(svc) => drop(self.state.services.insert(name.clone(), svc.clone())),
                None => drop(self.state.services.remove(name)),
            },
            Key::Slice(name) => match winner.and_then(|e| e.slices.get(name)) {
                Some(slice) => drop(self.state.slices.insert(name.clone(), slice.clone())),
                None => drop(self.state.slices.remove(name)),
            },
        }
    }

    fn errors(&self) -> Vec<ManifestError> {
        let mut errors: Vec<ManifestError> =
            self.files.values().flat_map(|e| e.errors.iter().cloned()).collect();
        for (key, files) in &self.contested {
            for other in &files[1..] {
                errors.push(ManifestError {
                    file: other.clone(),
                    object: Some(key.to_string()),
                    reason: format!("also defined in {}, whose definition is used", files[0].display()),
                });
            }
        }
        if let Some(e) = &self.unlisted {
            let (s, e2) = (self.state.services.len(), self.state.slices.len());
            errors.push(ManifestError {
                file: self.path.clone(),
                object: None,
                reason: format!("{e}: keeping the last state read ({s} Services, {e2} EndpointSlices)"),
            });
        }
        errors
    }
}

/// ", keeping the N objects it held before" when it held some.
fn kept(entry: &FileEntry) -> String {
    let n = entry.services.len() + entry.slices.len();
    if n == 0 { String::new() } else { format!(": keeping the {n} objects it held before") }
}

#[cfg(test)]
mod tests;
