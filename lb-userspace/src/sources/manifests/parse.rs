//! One manifest file's documents into objects, each problem reported with
//! the object it is about.

use std::{
    collections::{BTreeMap, btree_map::Entry},
    path::Path,
    sync::Arc,
};

use k8s_openapi::{
    Metadata, Resource,
    api::{
        core::v1::Endpoints,
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize as _, de::DeserializeOwned};
use serde_yaml_ng::Value;

use super::{Loaded, ManifestError};
use crate::model::{ClusterState, LABEL_SERVICE_NAME, object_ref};

/// Parses one file's documents into `loaded`; false when the file is not
/// valid YAML (or JSON) to its end: then it may be half written, and what
/// it held before is worth more than what parsed of it.
pub fn parse_into(file: &Path, text: &str, loaded: &mut Loaded) -> bool {
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
                return false;
            }
        }
    }
    true
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

/// Kinds of the Kubernetes API that may share a manifests folder and are
/// none of the proxy's business.
const OTHER_KINDS: &[&str] = &[
    "Namespace",
    "ConfigMap",
    "Secret",
    "Pod",
    "PodTemplate",
    "ReplicationController",
    "Deployment",
    "ReplicaSet",
    "StatefulSet",
    "DaemonSet",
    "Job",
    "CronJob",
    "Ingress",
    "IngressClass",
    "NetworkPolicy",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "StorageClass",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "LimitRange",
    "ResourceQuota",
    "PriorityClass",
    "CustomResourceDefinition",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "Node",
    "Event",
    "Lease",
    "RuntimeClass",
    "CSIDriver",
    "VolumeAttachment",
    "APIService",
    "Gateway",
    "HTTPRoute",
    "GatewayClass",
    "ServiceCIDR",
    "IPAddress",
    "Kustomization",
];

/// Whether `api_version` is one of Kubernetes' own groups (where the API
/// server knows every kind), not a custom resource's.
fn builtin_group(api_version: &str) -> bool {
    match api_version.split_once('/') {
        None => true,
        Some((group, _)) => !group.contains('.') || group.ends_with(".k8s.io"),
    }
}

fn add_object(v: Value, report: &mut dyn FnMut(Option<String>, String), state: &mut ClusterState) {
    let Some(kind) = str_field(&v, "kind").map(str::to_owned) else {
        report(None, "document without a kind: ignored".into());
        return;
    };
    let api_version = str_field(&v, "apiVersion").unwrap_or("v1");
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
        // Other kinds (Deployments, ConfigMaps...) may share the folder;
        // one the API server would not know is worth a word.
        other if OTHER_KINDS.contains(&other) || !builtin_group(api_version) => {}
        other => report(
            Some(what),
            format!(
                "unknown kind {other:?} in {api_version} (not Service, EndpointSlice or Endpoints): ignored"
            ),
        ),
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
            match into.entry(object_ref(obj.metadata())) {
                Entry::Occupied(_) => {
                    report(Some(what), "defined twice in this file: the first definition is used".into())
                }
                Entry::Vacant(slot) => drop(slot.insert(Arc::new(obj))),
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
