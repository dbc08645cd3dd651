//! kube-proxy parity in the namespace cluster, scenario by scenario: the
//! behaviours Kubernetes' own e2e Service tests check (`tests/E2E-PARITY.md`
//! maps each upstream title to the test here that covers it). Real agents,
//! real pods, real connections. Needs root.

use std::{path::Path, time::Duration};

use lb_tests::{
    cluster::{Cluster, NODE_ADDRS, standard_pods, tally},
    netns::wait_for,
};

fn cluster() -> Cluster {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    Cluster::new(&examples, &standard_pods()).expect("build the namespace cluster")
}

/// Restarts both agents with `extra` arguments.
fn restart_agents(c: &mut Cluster, extra: [&[&str]; 2]) {
    for (node, args) in extra.iter().enumerate() {
        c.agents[node].take().expect("an agent").stop().unwrap();
        c.agents[node] = Some(c.start_agent_args(node, args).unwrap());
    }
    c.wait_synced().unwrap();
}

/// Polls `url` from `from` (6 requests a round) until `check` holds.
fn eventually<P: lb_tests::netns::Place>(from: &P, url: &str, what: &str, check: impl Fn(&[String]) -> bool) {
    let mut last = Vec::new();
    let ok = wait_for(Duration::from_secs(5), || {
        last = Cluster::http(from, url, 6).ok()?;
        check(&last).then_some(())
    });
    assert!(ok.is_some(), "{what}: {:?}", tally(&last));
}

const ZONED: &str = "apiVersion: v1
kind: Service
metadata:
  name: zoned
  namespace: default
  annotations:
    service.kubernetes.io/topology-mode: Auto
spec:
  type: NodePort
  clusterIP: 10.96.0.50
  trafficDistribution: PreferClose
  ports:
    - port: 80
      targetPort: 8080
      nodePort: 30500
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: zoned-1
  namespace: default
  labels:
    kubernetes.io/service-name: zoned
addressType: IPv4
ports:
  - port: 8080
endpoints:
  - addresses: [\"10.244.1.10\"]
    nodeName: node-1
    zone: zone-a
    hints:
      forZones: [{name: zone-a}]
  - addresses: [\"10.244.1.11\"]
    nodeName: node-1
    zone: zone-a
    hints:
      forZones: [{name: zone-a}]
  - addresses: [\"10.244.2.10\"]
    nodeName: node-2
    zone: zone-b
    hints:
      forZones: [{name: zone-b}]
";

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn topology_hints_keep_traffic_in_its_zone_and_fall_back_when_a_zone_has_no_hint() {
    let mut c = cluster();
    restart_agents(&mut c, [&["--zone", "zone-a"], &["--zone", "zone-b"]]);
    c.write_manifest("zoned.yaml", ZONED).unwrap();
    let zone_a = ["web-a", "web-b"];
    // A pod in zone-a, the nodes themselves, and outside clients through
    // each node's NodePort: each node sends to its own zone's endpoints.
    let pod = &c.pod("client-pod").ns;
    eventually(pod, "http://10.96.0.50/", "zone-a pod", |a| a.iter().all(|x| zone_a.contains(&x.as_str())));
    let many = Cluster::http(pod, "http://10.96.0.50/", 30).unwrap();
    assert_eq!(tally(&many).len(), 2, "both zone-a endpoints serve: {:?}", tally(&many));
    eventually(&c.host(1), "http://10.96.0.50/", "node-2 itself", |a| a.iter().all(|x| x == "web-c"));
    let via_2 = format!("http://{}:30500/", NODE_ADDRS[1]);
    eventually(&c.client, &via_2, "outside via node-2", |a| a.iter().all(|x| x == "web-c"));
    let via_1 = format!("http://{}:30500/", NODE_ADDRS[0]);
    eventually(&c.client, &via_1, "outside via node-1", |a| a.iter().all(|x| zone_a.contains(&x.as_str())));
    // zone-b's endpoint loses its hint for zone-b (a zone with no hinted
    // endpoint): node-2 ignores the hints and uses every endpoint.
    c.write_manifest(
        "zoned.yaml",
        &ZONED.replace("forZones: [{name: zone-b}]", "forZones: [{name: zone-a}]"),
    )
    .unwrap();
    eventually(&c.host(1), "http://10.96.0.50/", "node-2 without a hint for its zone", |a| {
        a.iter().any(|x| zone_a.contains(&x.as_str()))
    });
    let spread = Cluster::http(&c.host(1), "http://10.96.0.50/", 40).unwrap();
    assert_eq!(tally(&spread).len(), 3, "all three endpoints from node-2: {:?}", tally(&spread));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn the_cluster_ip_catch_all_refuses_unused_ports_and_drops_unallocated_addresses() {
    let mut c = cluster();
    let cidr: &[&str] = &["--service-cidr", "10.96.0.0/16"];
    restart_agents(&mut c, [cidr, cidr]);
    let pod = &c.pod("client-pod").ns;
    // A ClusterIP on a port no Service uses: refused, from a pod and from the node.
    assert_eq!(Cluster::http_once(pod, "http://10.96.0.10:81/", 2), Err(7), "refused, not timed out");
    let out = Cluster::netcheck(&c.host(0), &["connect", "10.96.0.10:81"]).unwrap();
    assert!(out[0].starts_with("refused "), "{out:?}");
    // An address of the range no Service has: dropped.
    assert_eq!(Cluster::http_once(pod, "http://10.96.9.9/", 1), Err(28), "dropped");
    let out = Cluster::netcheck(&c.host(0), &["connect", "10.96.9.9:80"]).unwrap();
    assert!(out[0].contains("No route to host"), "{out:?}");
    // Services themselves answer as before.
    let answers = Cluster::http(pod, "http://10.96.0.10/", 6).unwrap();
    assert!(answers.iter().all(|a| a.starts_with("web-")), "{answers:?}");
    let stats = std::process::Command::new(lb_tests::netns::agent_binary())
        .args(["inspect", "stats", "-o", "json", "--pin-dir"])
        .arg(c.pin_dir(0))
        .output()
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    let count = |reason: &str| stats["drops"][reason].as_u64().unwrap_or(0);
    assert!(count("rejected_cluster_ip_port") >= 2, "{stats}");
    assert!(count("unallocated_cluster_ip") >= 2, "{stats}");
}

const SELF: &str = "apiVersion: v1
kind: Service
metadata:
  name: itself
  namespace: default
spec:
  clusterIP: 10.96.0.51
  ports:
    - name: http
      port: 80
      targetPort: 8080
    - name: dns
      port: 53
      protocol: UDP
      targetPort: 5353
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: itself-1
  namespace: default
  labels:
    kubernetes.io/service-name: itself
addressType: IPv4
ports:
  - name: http
    port: 8080
  - name: dns
    port: 5353
    protocol: UDP
endpoints:
  - addresses: [\"10.244.1.10\"]
    nodeName: node-1
";

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn hairpin_a_pod_reaches_itself_through_its_service_tcp_and_udp() {
    let c = cluster();
    c.write_manifest("itself.yaml", SELF).unwrap();
    let web_a = &c.pod("web-a").ns;
    eventually(web_a, "http://10.96.0.51/whoami", "web-a through its own Service", |a| {
        a.iter().all(|x| x.starts_with("web-a "))
    });
    // kube-proxy masquerades hairpin traffic: the pod sees the node.
    let seen = Cluster::http(web_a, "http://10.96.0.51/whoami", 1).unwrap();
    assert_eq!(seen, [format!("web-a {}", NODE_ADDRS[0])]);
    let tcp = Cluster::http(web_a, "http://10.96.0.51/", 1000).unwrap();
    assert_eq!(tally(&tcp).get("web-a"), Some(&1000), "1,000 of 1,000 TCP: {:?}", tally(&tcp));
    let udp = Cluster::udp(web_a, "10.96.0.51:53", 1000).unwrap();
    let answered = udp.iter().filter(|a| a.starts_with("web-a:")).count();
    assert_eq!(answered, 1000, "1,000 of 1,000 UDP: {:?}", tally(&udp));
}
