//! The Kubernetes source against a fake API server: list then watch,
//! add/modify/delete, a dropped connection, a 410 Gone relist, an API
//! server outage (last known state kept), and the node's identity.
//! No root needed.

use std::time::Duration;

use lb_tests::fake_api::{FakeApi, node, service, service_cidr, slice};
use lb_userspace::{model::ClusterState, sources::kubernetes::KubeSource};
use serde_json::json;
use tokio::sync::mpsc;

async fn eventually(source: &KubeSource, what: &str, check: impl Fn(&ClusterState) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if check(&source.snapshot()) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn endpoints(state: &ClusterState, slice: &str) -> usize {
    state.slices.get(&format!("default/{slice}")).map_or(0, |s| s.endpoints.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_api_server_through_watch_failures() {
    let api = FakeApi::default();
    api.apply(service("web", "10.96.0.10"));
    api.apply(slice("web", &["10.244.1.5"]));
    api.apply(node("node-1", "192.0.2.11", "zone-a"));
    api.apply(node("node-2", "192.0.2.12", "zone-b"));
    // Another proxy's service: filtered out by kube-proxy's label selector.
    let mut other = service("other-proxy", "10.96.0.99");
    other["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "someone-else"});
    api.apply(other);
    let (tx, mut changed) = mpsc::channel(1);
    let source = KubeSource::start(api.client(), "node-1", tx);

    // List, then watch.
    tokio::time::timeout(Duration::from_secs(10), source.ready()).await.expect("first sync").unwrap();
    let state = source.snapshot();
    assert!(state.services.contains_key("default/web"));
    assert!(!state.services.contains_key("default/other-proxy"), "another proxy's service was listed");
    assert_eq!(endpoints(&state, "web-1"), 1);
    let facts = source.node();
    assert_eq!(facts.zone.as_deref(), Some("zone-a"));
    assert_eq!(facts.addresses, vec!["192.0.2.11".parse::<std::net::Ipv4Addr>().unwrap()]);
    let requests = api.requests();
    assert!(
        requests.iter().any(|r| r.contains("labelSelector=%21service.kubernetes.io%2Fservice-proxy-name")),
        "kube-proxy's label filter is sent: {requests:?}"
    );
    assert!(requests.iter().any(|r| r.contains("fieldSelector=metadata.name%3Dnode-1")), "{requests:?}");
    assert!(changed.recv().await.is_some(), "changes are signalled");

    // Watch events: add, modify, delete.
    api.apply(service("api", "10.96.0.11"));
    eventually(&source, "added service", |s| s.services.contains_key("default/api")).await;
    api.apply(slice("web", &["10.244.1.5", "10.244.1.6"]));
    eventually(&source, "modified slice", |s| endpoints(s, "web-1") == 2).await;
    api.delete(service("api", "10.96.0.11"));
    eventually(&source, "deleted service", |s| !s.services.contains_key("default/api")).await;

    // A dropped connection: the watch is re-established and events flow again.
    api.drop_watches();
    tokio::time::sleep(Duration::from_millis(200)).await;
    api.apply(service("after-drop", "10.96.0.12"));
    eventually(&source, "event after a dropped watch", |s| s.services.contains_key("default/after-drop"))
        .await;

    // 410 Gone: the client relists and picks up what it missed.
    api.set_expired(true);
    api.apply_silently(service("missed", "10.96.0.13"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.set_expired(false);
    eventually(&source, "relist after 410 Gone", |s| s.services.contains_key("default/missed")).await;

    // The API server goes away: the last known state stays.
    api.set_down(true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = source.snapshot();
    assert!(during.services.contains_key("default/web") && during.services.contains_key("default/missed"));
    assert_eq!(endpoints(&during, "web-1"), 2);
    // Back again: changes made meanwhile arrive (backoff, then resume).
    api.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "while-down", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.14", "ports": [{"port": 80}]}}));
    api.set_down(false);
    eventually(&source, "recovery after an outage", |s| s.services.contains_key("default/while-down")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_cidrs_come_from_service_cidr_objects_where_the_api_server_has_them() {
    let api = FakeApi::default();
    api.apply(node("node-1", "192.0.2.11", "zone-a"));
    api.apply(service_cidr("kubernetes", &["10.96.0.0/12", "fd00:10:96::/112"]));
    let (tx, _changed) = mpsc::channel(1);
    let source = KubeSource::start(api.client(), "node-1", tx);
    tokio::time::timeout(Duration::from_secs(10), source.ready()).await.expect("first sync").unwrap();
    let cidrs =
        |source: &KubeSource| source.node().service_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cidrs(&source).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cidrs(&source), ["10.96.0.0/12"], "the IPv4 range (IPv6 waits for the IPv6 dataplane)");
    // A second range, as a cluster admin extends the service range.
    api.apply(service_cidr("extra", &["10.100.0.0/16"]));
    while cidrs(&source).len() < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cidrs(&source), ["10.96.0.0/12", "10.100.0.0/16"]);

    // An API server without ServiceCIDRs (before 1.33): the first sync
    // does not wait for them, there are none, and they are not asked again.
    let old = FakeApi::default();
    old.unserve("servicecidrs");
    old.apply(node("node-1", "192.0.2.11", "zone-a"));
    let (tx, _changed) = mpsc::channel(1);
    let source = KubeSource::start(old.client(), "node-1", tx);
    tokio::time::timeout(Duration::from_secs(10), source.ready()).await.expect("first sync").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(source.node().service_cidrs.is_empty());
    let asked = old.requests().iter().filter(|r| r.contains("servicecidrs")).count();
    assert_eq!(asked, 1, "asked once: {:?}", old.requests());
}
