//! The deployment in `deploy/`: every manifest parses into its Kubernetes
//! type with nothing dropped (a misspelt field fails), the kustomization
//! lists every file, and the RBAC rules grant exactly the API calls the
//! agent makes. No root needed.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    serde::{Serialize, de::DeserializeOwned},
};
use lb_tests::fake_api::{FakeApi, node, service, slice};
use lb_userspace::sources::kubernetes::KubeSource;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn documents(file: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(file).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde_yaml_ng::with::singleton_map_recursive::deserialize(doc).unwrap())
        .map(|v: serde_yaml_ng::Value| serde_json::to_value(v).unwrap())
        .collect()
}

/// Parses `doc` as `T` and checks nothing was lost on the way.
fn strict<T: DeserializeOwned + Serialize>(doc: &Value, file: &Path) -> T {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{}: not a valid {}: {e}", file.display(), doc["kind"]));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(&back, doc, "{}: fields were dropped or changed (misspelt or misplaced?)", file.display());
    typed
}

fn load() -> (Vec<(PathBuf, Value)>, Value) {
    let mut objects = Vec::new();
    let mut kustomization = Value::Null;
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(deploy_dir()).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for file in files {
        for doc in documents(&file) {
            if doc["kind"] == "Kustomization" {
                kustomization = doc;
            } else {
                objects.push((file.clone(), doc));
            }
        }
    }
    (objects, kustomization)
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    let (objects, kustomization) = load();
    let mut kinds = BTreeSet::new();
    for (file, doc) in &objects {
        let kind = doc["kind"].as_str().expect("kind").to_string();
        match kind.as_str() {
            "Namespace" => drop(strict::<Namespace>(doc, file)),
            "ServiceAccount" => drop(strict::<ServiceAccount>(doc, file)),
            "ClusterRole" => drop(strict::<ClusterRole>(doc, file)),
            "ClusterRoleBinding" => drop(strict::<ClusterRoleBinding>(doc, file)),
            "ConfigMap" => drop(strict::<ConfigMap>(doc, file)),
            "DaemonSet" => drop(strict::<DaemonSet>(doc, file)),
            other => panic!("{}: unexpected kind {other}", file.display()),
        }
        kinds.insert(kind);
    }
    assert_eq!(kinds.len(), 6, "{kinds:?}");
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .expect("kustomization resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let present: BTreeSet<String> =
        objects.iter().map(|(f, _)| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(listed, present, "kustomization.yaml lists every manifest");
}

#[test]
fn daemonset_runs_the_agent_as_the_bound_service_account() {
    let (objects, _) = load();
    let find = |kind: &str| objects.iter().find(|(_, d)| d["kind"] == kind).expect(kind);
    let (f, ds) = find("DaemonSet");
    let ds: DaemonSet = strict(ds, f);
    let (f, binding) = find("ClusterRoleBinding");
    let binding: ClusterRoleBinding = strict(binding, f);
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(pod.service_account_name.as_deref(), Some(subject.name.as_str()));
    assert_eq!(ds.metadata.namespace, subject.namespace);
    assert_eq!(pod.host_network, Some(true));
    let agent = &pod.containers[0];
    let caps = agent.security_context.as_ref().unwrap().capabilities.as_ref().unwrap();
    assert_eq!(caps.add.as_ref().unwrap(), &["BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"]);
    assert_ne!(agent.security_context.as_ref().unwrap().privileged, Some(true));
    let env: Vec<_> = agent.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert!(env.contains(&"NODE_NAME"), "node name from the downward API");
    let mounts: Vec<_> = agent.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    assert!(mounts.contains(&"/sys/fs/bpf"), "{mounts:?}");
    // The socket hooks attach to the host's cgroup root, mounted where the
    // ConfigMap says (a kube-proxy-free node needs them).
    let (f, config) = find("ConfigMap");
    let config: ConfigMap = strict(config, f);
    let data = config.data.unwrap();
    assert_eq!(data.get("LB_SOCKET_LB").map(String::as_str), Some("host"));
    let cgroup_root = data.get("LB_CGROUP_ROOT").expect("LB_CGROUP_ROOT");
    assert!(mounts.contains(&cgroup_root.as_str()), "{cgroup_root} is mounted: {mounts:?}");
    let cgroup_volume = pod.volumes.iter().flatten().find(|v| v.name == "cgroup").expect("a cgroup volume");
    assert_eq!(cgroup_volume.host_path.as_ref().map(|h| h.path.as_str()), Some("/sys/fs/cgroup"));
    assert!(agent.liveness_probe.is_some() && agent.readiness_probe.is_some());
}

/// `(apiGroup, resource, verb)` of a request the agent made.
fn call(uri: &str) -> (String, String, String) {
    let path = uri.split('?').next().unwrap();
    let verb = if uri.contains("watch=true") { "watch" } else { "list" };
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, resource) = match parts.as_slice() {
        ["api", "v1", resource] => ("", *resource),
        ["apis", group, _version, resource] => (*group, *resource),
        other => panic!("unexpected API path {other:?} (only cluster-wide list/watch is granted)"),
    };
    (group.to_string(), resource.to_string(), verb.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_grants_exactly_the_calls_the_agent_makes() {
    let api = FakeApi::default();
    api.apply(service("web", "10.96.0.10"));
    api.apply(slice("web", &["10.244.1.5"]));
    api.apply(node("node-1", "192.0.2.11", "zone-a"));
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let source = KubeSource::start(api.client(), "node-1", tx);
    tokio::time::timeout(Duration::from_secs(10), source.ready()).await.unwrap().unwrap();
    // Let every watch open after its list.
    let opened = async {
        while api.open_watches() < 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), opened).await.expect("four watches");
    let used: BTreeSet<_> = api.requests().iter().map(|r| call(r)).collect();

    let (objects, _) = load();
    let (file, role) = objects.iter().find(|(_, d)| d["kind"] == "ClusterRole").unwrap();
    let role: ClusterRole = strict(role, file);
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap() {
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    assert_eq!(used, granted, "the ClusterRole must grant exactly what the agent uses");
}
