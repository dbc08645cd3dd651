//! kube-proxy parity in the namespace cluster, scenario by scenario: the
//! behaviours Kubernetes' own e2e Service tests check (`tests/E2E-PARITY.md`
//! maps each upstream title to the test here that covers it). Real agents,
//! real pods, real connections. Needs root.

use std::{path::Path, time::Duration};

use lb_tests::{
    cluster::{Cluster, NODE_ADDRS, Topology, http_until, one_port_service, standard_pods, tally},
    netns::{Place, wait_for},
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

/// Asks `url` from `from` until `check` holds (see `http_until`).
fn eventually<P: Place>(from: &P, url: &str, what: &str, check: impl Fn(&[String]) -> bool) {
    http_until(from, url, what, check).unwrap();
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
    let stats = c.inspect(0, "stats").unwrap();
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

/// A one-port Service of `protocol` to the pods' servers (TCP 8080, UDP 5353).
fn service(
    name: &str,
    cluster_ip: &str,
    protocol: &str,
    port: u16,
    extra: &str,
    eps: &[(&str, &str)],
) -> String {
    let target = if protocol == "UDP" { 5353 } else { 8080 };
    one_port_service(name, cluster_ip, (protocol, port, target), extra, eps)
}

/// `lb-netcheck`'s timed lines (`<ms> <answer>`), from a finished child.
fn timed(child: std::process::Child) -> Vec<(u64, String)> {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(ms, a)| (ms.parse().unwrap(), a.to_string()))
        .collect()
}

/// The first answer from `who` after `after_ms`, and that nothing else
/// answered from then on.
fn moved_to(lines: &[(u64, String)], who: &str, after_ms: u64) -> u64 {
    let first = lines.iter().find(|(ms, a)| *ms >= after_ms && a.starts_with(who));
    let Some((at, _)) = first else { panic!("never reached {who}: {lines:?}") };
    let later: Vec<_> = lines.iter().filter(|(ms, _)| ms > at).filter(|(_, a)| !a.starts_with(who)).collect();
    assert!(later.is_empty(), "only {who} after {at} ms: {later:?}");
    at - after_ms
}

/// The clients of Kubernetes' UDP conntrack e2e tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UdpClient {
    PodToClusterIp,
    PodToLocalPolicy,
    OutsideToNodePort,
    NodeToClusterIp,
}

/// The upstream test's client (one source port, a new socket per query)
/// keeps getting answers while the server pod cycles (a new pod, at a new
/// address, takes over; the old one goes), and moves within 1 s.
fn udp_survives_the_server_pod_cycling(kinds: &[UdpClient]) {
    let mut c = cluster();
    // The upstream test's client: one source port, a new socket per query.
    let only = |addr: &str| {
        let mut yaml = service("cycle", "10.96.0.52", "UDP", 53, "  type: NodePort\n", &[(addr, "node-1")]);
        yaml = yaml.replace("      targetPort: 5353\n", "      targetPort: 5353\n      nodePort: 30520\n");
        let mut local = service(
            "cycle-local",
            "10.96.0.53",
            "UDP",
            53,
            "  internalTrafficPolicy: Local\n",
            &[(addr, "node-1")],
        );
        local.insert_str(0, "---\n");
        yaml + &local
    };
    c.write_manifest("cycle.yaml", &only("10.244.1.10")).unwrap();
    let answered = wait_for(Duration::from_secs(5), || {
        (Cluster::udp(&c.pod("client-pod").ns, "10.96.0.52:53", 1).ok()? == ["web-a:q0"]).then_some(())
    });
    assert!(answered.is_some(), "the UDP service answers");
    let pod = &c.pod("client-pod").ns;
    let node_port = format!("{}:30520", NODE_ADDRS[0]);
    let clients: Vec<_> = kinds
        .iter()
        .map(|kind| {
            let child = match kind {
                UdpClient::PodToClusterIp => {
                    Cluster::netcheck_spawn(pod, &["udp-loop", "10.96.0.52:53", "40052", "4000"])
                }
                UdpClient::PodToLocalPolicy => {
                    Cluster::netcheck_spawn(pod, &["udp-loop", "10.96.0.53:53", "40053", "4000"])
                }
                UdpClient::OutsideToNodePort => {
                    Cluster::netcheck_spawn(&c.client, &["udp-loop", &node_port, "40054", "4000"])
                }
                UdpClient::NodeToClusterIp => {
                    Cluster::netcheck_spawn(&c.host(0), &["udp-loop", "10.96.0.52:53", "40055", "4000"])
                }
            };
            (kind, child.unwrap())
        })
        .collect();
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    // The server pod cycles: a new pod (new address) takes over, the old one
    // goes, from every slice that listed it (the examples' echo-udp too).
    c.add_pod(lb_tests::cluster::PodSpec::new("web-new", 0, "10.244.1.20")).unwrap();
    let echo_udp = std::fs::read_to_string(c.manifests.join("07-udp.yaml")).unwrap();
    let without_web_a = echo_udp.replace("  - addresses: [\"10.244.1.10\"]\n    nodeName: node-1\n", "");
    assert_ne!(echo_udp, without_web_a, "web-a is in echo-udp's slice");
    c.write_manifest("07-udp.yaml", &without_web_a).unwrap();
    c.write_manifest("cycle.yaml", &only("10.244.1.20")).unwrap();
    let changed = started.elapsed().as_millis() as u64;
    c.pods.retain(|p| p.spec.name != "web-a");
    for (what, child) in clients {
        let lines = timed(child);
        assert!(lines.iter().any(|(_, a)| a.starts_with("web-a:")), "{what:?}: web-a first: {lines:?}");
        let gap = moved_to(&lines, "web-new:", changed);
        assert!(gap <= 1000, "{what:?}: moved {gap} ms after the change: {lines:?}");
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn networking_granular_checks_services_should_update_endpoints_udp() {
    use UdpClient::*;
    udp_survives_the_server_pod_cycling(&[
        PodToClusterIp,
        PodToLocalPolicy,
        OutsideToNodePort,
        NodeToClusterIp,
    ]);
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn conntrack_should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_node_port_service() {
    udp_survives_the_server_pod_cycling(&[UdpClient::OutsideToNodePort]);
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn conntrack_should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_cluster_ip_service() {
    udp_survives_the_server_pod_cycling(&[UdpClient::PodToClusterIp]);
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn conntrack_should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_cluster_ip_service_with_internal_traffic_policy_set_to_local()
 {
    udp_survives_the_server_pod_cycling(&[UdpClient::PodToLocalPolicy]);
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn conntrack_should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_cluster_ip_service_and_client_is_host_network()
 {
    udp_survives_the_server_pod_cycling(&[UdpClient::NodeToClusterIp]);
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn conntrack_udp_traffic_flows_as_soon_as_initially_unready_endpoints_get_ready() {
    let c = cluster();
    let unready = service("late", "10.96.0.54", "UDP", 53, "", &[("10.244.1.10", "node-1")])
        .replace("    nodeName: node-1\n", "    nodeName: node-1\n    conditions: {ready: false}\n");
    c.write_manifest("late.yaml", &unready).unwrap();
    let pod = &c.pod("client-pod").ns;
    let refused = wait_for(Duration::from_secs(5), || {
        (Cluster::udp(pod, "10.96.0.54:53", 1).ok()? == ["refused"]).then_some(())
    });
    assert!(refused.is_some(), "no ready endpoint: refused");
    let client = Cluster::netcheck_spawn(pod, &["udp-loop", "10.96.0.54:53", "40056", "2500"]).unwrap();
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(800));
    c.write_manifest(
        "late.yaml",
        &service("late", "10.96.0.54", "UDP", 53, "", &[("10.244.1.10", "node-1")]),
    )
    .unwrap();
    let changed = started.elapsed().as_millis() as u64;
    let lines = timed(client);
    assert!(
        lines.iter().any(|(_, a)| a.contains("refused") || a.contains("error")),
        "refused first: {lines:?}"
    );
    let gap = moved_to(&lines, "web-a:", changed);
    assert!(gap <= 1000, "answers {gap} ms after the endpoint got ready: nothing cached from the reject");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn tcp_connections_to_an_endpoint_that_left_the_slice_keep_working_and_new_ones_avoid_it() {
    let c = cluster();
    let echo = |addr: &str, node: &str| {
        service("echo", "10.96.0.55", "TCP", 7000, "", &[(addr, node)])
            .replace("targetPort: 8080", "targetPort: 7000")
            .replace("  - port: 8080\n", "  - port: 7000\n")
    };
    c.write_manifest("echo.yaml", &echo("10.244.1.10", "node-1")).unwrap();
    let pod = &c.pod("client-pod").ns;
    let up = wait_for(Duration::from_secs(5), || {
        Cluster::netcheck(pod, &["connect", "10.96.0.55:7000"]).ok()?[0].starts_with("ok ").then_some(())
    });
    assert!(up.is_some());
    let from_pod = Cluster::stream(pod, "10.96.0.55:7000", 3).unwrap();
    let from_node = Cluster::netcheck_spawn(&c.host(0), &["stream", "10.96.0.55:7000", "3"]).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    // web-a leaves the slice (still running, as a terminating pod would).
    c.write_manifest("echo.yaml", &echo("10.244.2.10", "node-2")).unwrap();
    let web = service("web-echo-check", "10.96.0.56", "TCP", 80, "", &[("10.244.2.10", "node-2")]);
    c.write_manifest("echo-check.yaml", &web).unwrap();
    eventually(pod, "http://10.96.0.56/", "the change is applied", |a| a.iter().all(|x| x == "web-c"));
    for (what, child) in [("pod", from_pod), ("node", from_node)] {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.starts_with("ok "), "{what}: the stream kept going: {text}");
    }
    // New connections go to the endpoint that is left.
    let seen = Cluster::netcheck(pod, &["connect", "10.96.0.55:7000"]).unwrap();
    assert!(seen[0].starts_with("ok "), "{seen:?}");
    let answer = Cluster::http(pod, "http://10.96.0.56/", 3).unwrap();
    assert!(answer.iter().all(|a| a == "web-c"), "{answer:?}");
}

/// Waits (at most 1 s, the bound) until `check` holds; how long it took.
fn within_a_second(what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = std::time::Instant::now();
    let ok = wait_for(Duration::from_millis(1000), || check().then_some(()));
    assert!(ok.is_some(), "{what}: not within 1 s");
    started.elapsed()
}

fn typed(kind: &str) -> String {
    let spec = match kind {
        "ExternalName" => "  type: ExternalName\n  externalName: db.example.com\n".to_string(),
        "ClusterIP" => "  type: ClusterIP\n  clusterIP: 10.96.0.57\n".to_string(),
        _ => "  type: NodePort\n  clusterIP: 10.96.0.57\n".to_string(),
    };
    let node_port = if kind == "NodePort" { "      nodePort: 30570\n" } else { "" };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: morph\n  namespace: default\nspec:\n{spec}  ports:\n    - port: 80\n      \
         targetPort: 8080\n{node_port}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: morph-1\n  \
         namespace: default\n  labels:\n    kubernetes.io/service-name: morph\naddressType: IPv4\nports:\n  - port: 8080\n\
         endpoints:\n  - addresses: [\"10.244.2.10\"]\n    nodeName: node-2\n"
    )
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_change_type_external_name_cluster_ip_node_port_and_back_and_a_deleted_node_port_is_released() {
    let c = cluster();
    let pod = &c.pod("client-pod").ns;
    let node_port = format!("http://{}:30570/", NODE_ADDRS[0]);
    // Answers are polled with quick probes, stops with whole ones.
    let cluster_ip = || Cluster::http_probe(pod, "http://10.96.0.57/").as_deref() == Ok("web-c");
    let via_node = || Cluster::http_probe(&c.client, &node_port).as_deref() == Ok("web-c");
    let cluster_ip_stopped = || Cluster::http_once(pod, "http://10.96.0.57/", 1).is_err();
    let node_port_stopped = || Cluster::http_once(&c.client, &node_port, 1).is_err();
    c.write_manifest("morph.yaml", &typed("ExternalName")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(cluster_ip_stopped(), "ExternalName: no ClusterIP");
    c.write_manifest("morph.yaml", &typed("ClusterIP")).unwrap();
    within_a_second("ExternalName → ClusterIP answers", cluster_ip);
    c.write_manifest("morph.yaml", &typed("NodePort")).unwrap();
    within_a_second("ClusterIP → NodePort answers on the node port", via_node);
    assert!(cluster_ip(), "and still on the ClusterIP");
    c.write_manifest("morph.yaml", &typed("ClusterIP")).unwrap();
    within_a_second("NodePort → ClusterIP releases the node port", node_port_stopped);
    assert!(cluster_ip());
    c.write_manifest("morph.yaml", &typed("ExternalName")).unwrap();
    within_a_second("ClusterIP → ExternalName stops the ClusterIP", cluster_ip_stopped);
    // And in one step each: ExternalName → NodePort → ExternalName.
    c.write_manifest("morph.yaml", &typed("NodePort")).unwrap();
    within_a_second("ExternalName → NodePort answers on the node port", via_node);
    assert!(cluster_ip(), "and on the ClusterIP");
    c.write_manifest("morph.yaml", &typed("ExternalName")).unwrap();
    within_a_second("NodePort → ExternalName releases the node port", node_port_stopped);
    assert!(cluster_ip_stopped(), "and the ClusterIP");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_serve_the_same_port_for_tcp_and_udp_and_removing_udp_stops_only_udp() {
    let c = cluster();
    let both = |udp: bool| {
        let udp_port = if udp {
            "    - name: dns\n      port: 53\n      protocol: UDP\n      targetPort: 5353\n"
        } else {
            ""
        };
        let udp_slice = if udp { "  - name: dns\n    port: 5353\n    protocol: UDP\n" } else { "" };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: dual\n  namespace: default\nspec:\n  clusterIP: 10.96.0.58\n  \
             ports:\n    - name: tcp\n      port: 53\n      protocol: TCP\n      targetPort: 8080\n{udp_port}---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dual-1\n  namespace: default\n  \
             labels:\n    kubernetes.io/service-name: dual\naddressType: IPv4\nports:\n  - name: tcp\n    port: 8080\n{udp_slice}\
             endpoints:\n  - addresses: [\"10.244.1.10\"]\n    nodeName: node-1\n"
        )
    };
    c.write_manifest("dual.yaml", &both(true)).unwrap();
    let pod = &c.pod("client-pod").ns;
    let tcp_ok = || Cluster::http_probe(pod, "http://10.96.0.58:53/").as_deref() == Ok("web-a");
    let udp_ok = || Cluster::udp(pod, "10.96.0.58:53", 1).is_ok_and(|a| a == ["web-a:q0"]);
    within_a_second("TCP on port 53", tcp_ok);
    within_a_second("UDP on port 53", udp_ok);
    c.write_manifest("dual.yaml", &both(false)).unwrap();
    within_a_second("UDP stops", || !udp_ok());
    assert!(tcp_ok(), "TCP keeps working");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn endpoint_slices_a_service_with_ports_and_endpoint_addresses_spread_over_several_slices() {
    let c = cluster();
    // Upstream's two conformance cases at once: one port per slice for the
    // same pod, and a different pod per slice.
    let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: spread\n  namespace: default\nspec:\n  clusterIP: 10.96.0.59\n  \
                ports:\n    - name: http\n      port: 80\n      targetPort: 8080\n    - name: alt\n      port: 81\n      \
                targetPort: 9090\n";
    let slice = |name: &str, port_name: &str, port: u16, addr: &str| {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  \
             labels:\n    kubernetes.io/service-name: spread\naddressType: IPv4\nports:\n  - name: {port_name}\n    port: {port}\n\
             endpoints:\n  - addresses: [\"{addr}\"]\n"
        )
    };
    let all = format!(
        "{yaml}{}{}{}",
        slice("spread-a", "http", 8080, "10.244.1.10"),
        slice("spread-b", "alt", 9090, "10.244.1.10"),
        slice("spread-c", "http", 8080, "10.244.2.10")
    );
    c.write_manifest("spread.yaml", &all).unwrap();
    let pod = &c.pod("client-pod").ns;
    eventually(pod, "http://10.96.0.59:81/", "the alt port's slice", |a| a.iter().all(|x| x == "web-a:9090"));
    let http = Cluster::http(pod, "http://10.96.0.59/", 30).unwrap();
    assert_eq!(
        tally(&http).keys().map(String::as_str).collect::<Vec<_>>(),
        ["web-a", "web-c"],
        "both slices' addresses serve the http port"
    );
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn session_affinity_switches_from_client_ip_to_none_and_back() {
    let c = cluster();
    let affinity = |a: &str| {
        service(
            "switch",
            "10.96.0.60",
            "TCP",
            80,
            &format!("  type: NodePort\n  sessionAffinity: {a}\n"),
            &[("10.244.1.10", "node-1"), ("10.244.1.11", "node-1"), ("10.244.2.10", "node-2")],
        )
        .replace("      targetPort: 8080\n", "      targetPort: 8080\n      nodePort: 30600\n")
    };
    let node_port = format!("http://{}:30600/", NODE_ADDRS[1]);
    // From a pod through the ClusterIP, and from outside through a NodePort.
    for (from, url) in [(&c.pod("client-pod").ns, "http://10.96.0.60/"), (&c.client, node_port.as_str())] {
        c.write_manifest("switch.yaml", &affinity("ClientIP")).unwrap();
        eventually(from, url, "ClientIP sticks", |a| tally(a).len() == 1);
        c.write_manifest("switch.yaml", &affinity("None")).unwrap();
        eventually(from, url, "None spreads", |a| tally(a).len() > 1);
        c.write_manifest("switch.yaml", &affinity("ClientIP")).unwrap();
        let mut sticky = Vec::new();
        let stuck = wait_for(Duration::from_secs(5), || {
            sticky = Cluster::http(from, url, 20).ok()?;
            (tally(&sticky).len() == 1).then_some(())
        });
        assert!(stuck.is_some(), "{url}: ClientIP sticks again: {:?}", tally(&sticky));
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn health_check_node_port_fails_when_only_terminating_endpoints_are_left_while_traffic_is_served() {
    let c = cluster();
    let lb = |conditions: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: draining\n  namespace: default\nspec:\n  type: LoadBalancer\n  \
             clusterIP: 10.96.0.61\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32610\n  ports:\n    - port: 80\n      \
             targetPort: 8080\n      nodePort: 30610\nstatus:\n  loadBalancer:\n    ingress:\n      - ip: 198.51.100.61\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: draining-1\n  namespace: default\n  \
             labels:\n    kubernetes.io/service-name: draining\naddressType: IPv4\nports:\n  - port: 8080\nendpoints:\n  \
             - addresses: [\"10.244.1.10\"]\n    nodeName: node-1\n    conditions: {conditions}\n"
        )
    };
    let code = || {
        let out = c
            .client
            .cmd("curl")
            .args(["-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://{}:32610/", NODE_ADDRS[0]))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    c.write_manifest("draining.yaml", &lb("{ready: true}")).unwrap();
    let ok = wait_for(Duration::from_secs(5), || (code() == "200").then_some(()));
    assert!(ok.is_some(), "a ready local endpoint: 200");
    c.write_manifest("draining.yaml", &lb("{ready: false, serving: true, terminating: true}")).unwrap();
    within_a_second("only a terminating endpoint: 503", || code() == "503");
    // Traffic still reaches it (the terminating fallback), through the
    // LoadBalancer IP and the NodePort.
    for url in ["http://198.51.100.61/".to_string(), format!("http://{}:30610/", NODE_ADDRS[0])] {
        assert_eq!(Cluster::http_once(&c.client, &url, 2).as_deref(), Ok("web-a"), "{url}");
    }
}

/// `service` with the endpoints given as `(address, node, conditions)`.
fn with_conditions(name: &str, ip: &str, extra: &str, eps: &[(&str, &str, &str)]) -> String {
    let plain: Vec<(&str, &str)> = eps.iter().map(|(a, n, _)| (*a, *n)).collect();
    let mut yaml = service(name, ip, "TCP", 80, extra, &plain);
    for (a, n, cond) in eps {
        if !cond.is_empty() {
            let at = format!("  - addresses: [\"{a}\"]\n    nodeName: {n}\n");
            yaml = yaml.replace(&at, &format!("{at}    conditions: {cond}\n"));
        }
    }
    yaml
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_serve_a_basic_endpoint_from_pods_as_its_endpoints_change() {
    let c = cluster();
    let pod = &c.pod("client-pod").ns;
    let eps = |e: &[(&str, &str)]| service("basic", "10.96.0.62", "TCP", 80, "", e);
    c.write_manifest("basic.yaml", &eps(&[("10.244.1.10", "node-1")])).unwrap();
    eventually(pod, "http://10.96.0.62/", "pod1", |a| a.iter().all(|x| x == "web-a"));
    c.write_manifest("basic.yaml", &eps(&[("10.244.1.10", "node-1"), ("10.244.2.10", "node-2")])).unwrap();
    eventually(pod, "http://10.96.0.62/", "pod1 and pod2", |a| tally(a).len() == 2);
    c.write_manifest("basic.yaml", &eps(&[("10.244.2.10", "node-2")])).unwrap();
    eventually(pod, "http://10.96.0.62/", "pod2", |a| a.iter().all(|x| x == "web-c"));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_preserve_source_pod_ip_for_traffic_thru_service_cluster_ip() {
    let c = cluster();
    let pod = &c.pod("client-pod").ns;
    for (addr, node, who) in [("10.244.1.10", "node-1", "web-a"), ("10.244.2.10", "node-2", "web-c")] {
        c.write_manifest("source.yaml", &service("source", "10.96.0.63", "TCP", 80, "", &[(addr, node)]))
            .unwrap();
        let want = format!("{who} 10.244.1.50");
        eventually(pod, "http://10.96.0.63/whoami", &format!("{who} sees the pod's address"), |a| {
            a.iter().all(|x| *x == want)
        });
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_be_able_to_up_and_down_services_and_work_after_being_recreated() {
    let c = cluster();
    let pod = &c.pod("client-pod").ns;
    let up = |ip: &str| service("updown", ip, "TCP", 80, "", &[("10.244.2.10", "node-2")]);
    let answers = |from: &dyn Fn() -> Result<String, i32>| from().as_deref() == Ok("web-c");
    c.write_manifest("updown.yaml", &up("10.96.0.64")).unwrap();
    within_a_second("up, from a pod", || answers(&|| Cluster::http_probe(pod, "http://10.96.0.64/")));
    assert!(answers(&|| Cluster::http_once(&c.host(0), "http://10.96.0.64/", 1)), "and from the node");
    std::fs::remove_file(c.manifests.join("updown.yaml")).unwrap();
    within_a_second("down", || !answers(&|| Cluster::http_once(pod, "http://10.96.0.64/", 1)));
    assert!(!answers(&|| Cluster::http_once(&c.host(0), "http://10.96.0.64/", 1)), "down from the node too");
    // Recreated, with another ClusterIP.
    c.write_manifest("updown.yaml", &up("10.96.0.65")).unwrap();
    within_a_second("recreated", || answers(&|| Cluster::http_probe(pod, "http://10.96.0.65/")));
    assert!(answers(&|| Cluster::http_once(&c.host(1), "http://10.96.0.65/", 1)));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_implement_service_proxy_name_and_headless_labels() {
    let c = cluster();
    let pod = &c.pod("client-pod").ns;
    let labelled = |label: &str| {
        service("labelled", "10.96.0.66", "TCP", 80, "", &[("10.244.2.10", "node-2")]).replacen(
            "  namespace: default\n",
            &format!("  namespace: default\n{label}"),
            1,
        )
    };
    let ok = || Cluster::http_probe(pod, "http://10.96.0.66/").as_deref() == Ok("web-c");
    let stopped = || Cluster::http_once(pod, "http://10.96.0.66/", 1).is_err();
    c.write_manifest("labelled.yaml", &labelled("")).unwrap();
    within_a_second("served", ok);
    for label in [
        "  labels:\n    service.kubernetes.io/service-proxy-name: someone-else\n",
        "  labels:\n    service.kubernetes.io/headless: \"\"\n",
    ] {
        c.write_manifest("labelled.yaml", &labelled(label)).unwrap();
        within_a_second(&format!("{label}: not served"), stopped);
        c.write_manifest("labelled.yaml", &labelled("")).unwrap();
        within_a_second("served again without the label", ok);
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_have_session_affinity_timeout_work_for_cluster_ip_and_node_port() {
    let c = cluster();
    let eps = [("10.244.1.10", "node-1"), ("10.244.1.11", "node-1"), ("10.244.2.10", "node-2")];
    let extra = "  type: NodePort\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 1\n";
    let yaml = service("brief", "10.96.0.67", "TCP", 80, extra, &eps)
        .replace("      targetPort: 8080\n", "      targetPort: 8080\n      nodePort: 30670\n");
    c.write_manifest("brief.yaml", &yaml).unwrap();
    let pod = &c.pod("client-pod").ns;
    let node_port = format!("http://{}:30670/", NODE_ADDRS[0]);
    for (what, from, url) in
        [("ClusterIP", pod, "http://10.96.0.67/"), ("NodePort", &c.client, node_port.as_str())]
    {
        eventually(from, url, &format!("{what}: sticky within the timeout"), |a| tally(a).len() == 1);
        // Idle past the timeout, each round may get another backend.
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..8 {
            seen.extend(Cluster::http(from, url, 3).unwrap());
            std::thread::sleep(Duration::from_millis(1300));
        }
        assert!(seen.len() > 1, "{what}: the affinity expired: {seen:?}");
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_respect_internal_traffic_policy_local_pod_to_pod() {
    let c = cluster();
    let pod = &c.pod("client-pod").ns;
    let local = |addr: &str, node: &str| {
        service("itp", "10.96.0.68", "TCP", 80, "  internalTrafficPolicy: Local\n", &[(addr, node)])
    };
    c.write_manifest("itp.yaml", &local("10.244.1.10", "node-1")).unwrap();
    eventually(pod, "http://10.96.0.68/", "the same node's endpoint", |a| a.iter().all(|x| x == "web-a"));
    c.write_manifest("itp.yaml", &local("10.244.2.10", "node-2")).unwrap();
    within_a_second("another node's endpoint is not used", || {
        Cluster::http_once(pod, "http://10.96.0.68/", 1).is_err()
    });
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_cluster_policies()
{
    let c = cluster();
    let terminating = "{ready: false, serving: true, terminating: true}";
    let yaml = with_conditions(
        "fallback",
        "10.96.0.69",
        "  type: NodePort\n",
        &[
            ("10.244.2.10", "node-2", terminating),
            ("10.244.1.11", "node-1", "{ready: false, serving: false, terminating: true}"),
        ],
    )
    .replace("      targetPort: 8080\n", "      targetPort: 8080\n      nodePort: 30690\n");
    c.write_manifest("fallback.yaml", &yaml).unwrap();
    // iTP=Cluster from pods on both nodes' sides, eTP=Cluster through both nodes.
    eventually(&c.pod("client-pod").ns, "http://10.96.0.69/", "ClusterIP", |a| {
        a.iter().all(|x| x == "web-c")
    });
    eventually(&c.host(1), "http://10.96.0.69/", "ClusterIP from node-2", |a| a.iter().all(|x| x == "web-c"));
    for node in NODE_ADDRS {
        let url = format!("http://{node}:30690/");
        eventually(&c.client, &url, &format!("NodePort via {node}"), |a| a.iter().all(|x| x == "web-c"));
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn granular_checks_services_should_function_for_multiple_endpoint_services_with_same_selector() {
    let c = cluster();
    let pod = &c.pod("client-pod").ns;
    let eps = [("10.244.1.10", "node-1"), ("10.244.2.10", "node-2")];
    c.write_manifest("twin-a.yaml", &service("twin-a", "10.96.0.70", "TCP", 80, "", &eps)).unwrap();
    c.write_manifest("twin-b.yaml", &service("twin-b", "10.96.0.71", "TCP", 80, "", &eps)).unwrap();
    for url in ["http://10.96.0.70/", "http://10.96.0.71/"] {
        eventually(pod, url, url, |a| a.iter().all(|x| x == "web-a" || x == "web-c"));
    }
    std::fs::remove_file(c.manifests.join("twin-a.yaml")).unwrap();
    within_a_second("the deleted one stops", || Cluster::http_once(pod, "http://10.96.0.70/", 1).is_err());
    let other = Cluster::http(pod, "http://10.96.0.71/", 20).unwrap();
    assert_eq!(tally(&other).len(), 2, "the other keeps both endpoints: {:?}", tally(&other));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn granular_checks_services_should_function_for_client_ip_based_session_affinity_udp() {
    let c = cluster();
    let eps = [("10.244.1.10", "node-1"), ("10.244.1.11", "node-1"), ("10.244.2.10", "node-2")];
    let yaml = service("sticky-udp", "10.96.0.72", "UDP", 53, "  sessionAffinity: ClientIP\n", &eps);
    c.write_manifest("sticky-udp.yaml", &yaml).unwrap();
    let pod = &c.pod("client-pod").ns;
    let mut answers = Vec::new();
    let ok = wait_for(Duration::from_secs(5), || {
        answers = Cluster::udp(pod, "10.96.0.72:53", 20).ok()?;
        answers.iter().all(|a| a.starts_with("web-")).then_some(())
    });
    assert!(ok.is_some(), "{answers:?}");
    // Each query from a new socket (a new source port): one endpoint anyway.
    let who: std::collections::BTreeSet<&str> = answers.iter().filter_map(|a| a.split(':').next()).collect();
    assert_eq!(who.len(), 1, "{answers:?}");
}

/// A Service on web-a, web-b (node-1, zone-a) and web-c (node-2, zone-b),
/// hinted `nodes` (web-a's, web-b's, web-c's) and by zone.
fn near(web_a_node: &str) -> String {
    let ep = |addr: &str, node: &str, hint: &str, zone: &str| {
        format!(
            "  - addresses: [\"{addr}\"]\n    nodeName: {node}\n    zone: {zone}\n    hints:\n      forNodes: [{{name: {hint}}}]\n      \
             forZones: [{{name: {zone}}}]\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: near\n  namespace: default\nspec:\n  clusterIP: 10.96.0.73\n  \
         trafficDistribution: PreferSameNode\n  ports:\n    - port: 80\n      targetPort: 8080\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: near-1\n  namespace: default\n  labels:\n    \
         kubernetes.io/service-name: near\naddressType: IPv4\nports:\n  - port: 8080\nendpoints:\n{}{}{}",
        ep("10.244.1.10", "node-1", web_a_node, "zone-a"),
        ep("10.244.1.11", "node-1", "node-3", "zone-a"),
        ep("10.244.2.10", "node-2", "node-2", "zone-b"),
    )
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn traffic_distribution_prefer_same_node_routes_to_the_same_node_or_falls_back_to_the_zone() {
    let mut c = cluster();
    restart_agents(&mut c, [&["--zone", "zone-a"], &["--zone", "zone-b"]]);
    c.write_manifest("near.yaml", &near("node-1")).unwrap();
    let pod = &c.pod("client-pod").ns;
    eventually(pod, "http://10.96.0.73/", "node-1: its own node's endpoint", |a| {
        a.iter().all(|x| x == "web-a")
    });
    let many = Cluster::http(pod, "http://10.96.0.73/", 20).unwrap();
    assert!(many.iter().all(|x| x == "web-a"), "{:?}", tally(&many));
    eventually(&c.host(1), "http://10.96.0.73/", "node-2: its own node's endpoint", |a| {
        a.iter().all(|x| x == "web-c")
    });
    // No endpoint is hinted for node-1 any more: its zone's endpoints serve.
    c.write_manifest("near.yaml", &near("node-4")).unwrap();
    eventually(pod, "http://10.96.0.73/", "node-1 falls back to zone-a", |a| a.iter().any(|x| x == "web-b"));
    let zone = Cluster::http(pod, "http://10.96.0.73/", 20).unwrap();
    assert!(zone.iter().all(|x| x == "web-a" || x == "web-b"), "zone-a only: {:?}", tally(&zone));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn granular_checks_services_should_be_able_to_handle_large_requests_udp() {
    large_udp_requests(cluster());
    // Again on NIC-like links, where the agents use XDP.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let nic_like = Cluster::with_topology(&examples, &standard_pods(), Topology::NicLike).unwrap();
    assert!(nic_like.agent_log(0).contains("hook=xdp"), "XDP on node-1: {}", nic_like.agent_log(0));
    large_udp_requests(nic_like);
}

fn large_udp_requests(c: Cluster) {
    // One backend on each node: the fragments of the request and of the
    // echoed answer cross the bridge or stay on the node.
    let yaml = service(
        "large",
        "10.96.0.80",
        "UDP",
        53,
        "  type: NodePort\n",
        &[("10.244.1.10", "node-1"), ("10.244.2.10", "node-2")],
    )
    .replace("      targetPort: 5353\n", "      targetPort: 5353\n      nodePort: 30580\n");
    c.write_manifest("large.yaml", &yaml).unwrap();
    let pod = &c.pod("client-pod").ns;
    udp_answers(pod, "10.96.0.80:53");
    // Upstream sends 2,000 bytes: over the 1,500-byte MTU, so in fragments.
    // (The control: the network itself carries them, pod to pod.)
    let direct = Cluster::netcheck(pod, &["udp-large", "10.244.2.10:5353", "2000", "3"]).unwrap();
    assert_eq!(direct, ["web-c ok"; 3], "straight to the pod");
    let node_port = format!("{}:30580", NODE_ADDRS[0]);
    for (from, to) in [(pod, "10.96.0.80:53"), (&c.client, node_port.as_str())] {
        let answers = Cluster::netcheck(from, &["udp-large", to, "2000", "20"]).unwrap();
        let t = tally(&answers);
        let intact = t.get("web-a ok").unwrap_or(&0) + t.get("web-c ok").unwrap_or(&0);
        assert_eq!(intact, 20, "{to}: 20 of 20 large datagrams echoed intact: {t:?}");
        assert!(t.contains_key("web-a ok") && t.contains_key("web-c ok"), "{to}: both backends: {t:?}");
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn conntrack_should_drop_invalid_conntrack_entries() {
    let c = cluster();
    // The boom server on the other node (upstream's layout) and on the
    // client's own node, each behind a ClusterIP.
    for (name, ip, pod, node) in [
        ("boom-remote", "10.96.0.81", "10.244.2.10", "node-2"),
        ("boom-local", "10.96.0.82", "10.244.1.10", "node-1"),
    ] {
        c.write_manifest(
            &format!("{name}.yaml"),
            &one_port_service(name, ip, ("TCP", 9000, 9000), "", &[(pod, node)]),
        )
        .unwrap();
    }
    let client = &c.pod("client-pod").ns;
    for (ip, server) in [("10.96.0.81:9000", "web-c"), ("10.96.0.82:9000", "web-a")] {
        // Shift 1 first: the control, a stray segment from a port without a
        // connection, which the client does answer with a RST (so the RST
        // counting works); then the upstream case on the connection's port.
        for (shift, expect_rst) in [("1", true), ("0", false)] {
            let mut boom = Background(vec![
                Cluster::netcheck_spawn(&c.pod(server).ns, &["boom", "9000", "5", shift]).unwrap(),
            ]);
            let mut streams = Vec::new();
            let up = wait_for(Duration::from_secs(3), || {
                Cluster::netcheck(client, &["stream", ip, "1"]).ok().filter(|l| l[0].starts_with("ok"))
            });
            assert!(up.is_some(), "{ip}: the boom server answers through its Service");
            for _ in 0..2 {
                streams.push(Cluster::netcheck(client, &["stream", ip, "1"]).unwrap().join(" "));
            }
            let out = boom.0.pop().expect("the boom server").wait_with_output().unwrap();
            let report = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert!(out.status.success(), "boom: {}", String::from_utf8_lossy(&out.stderr));
            let counts: Vec<u32> =
                report.split(' ').skip(1).step_by(2).filter_map(|n| n.parse().ok()).collect();
            let [connections, bad, rst] = counts[..] else { panic!("boom printed {report:?}") };
            assert!(connections >= 3 && bad == connections, "{ip}: a bad segment per connection: {report}");
            if expect_rst {
                assert!(rst >= bad, "{ip}: the control's stray segments were answered with RSTs: {report}");
            } else {
                assert_eq!(rst, 0, "{ip}: no RST for the out-of-window segments: {report}");
                assert!(streams.iter().all(|s| s.starts_with("ok")), "{ip}: connections kept: {streams:?}");
            }
        }
    }
}

/// Processes that end with the test, failed or not.
struct Background(Vec<std::process::Child>);

impl Drop for Background {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// hostNetwork servers: `lb-netcheck serve` in each node's own namespace,
/// answering `node-1-host` / `node-2-host`; and Service `name` (TCP 80 →
/// 8080, `extra` spec lines) to them.
fn host_network_endpoints(c: &Cluster, name: &str, cluster_ip: &str, extra: &str) -> (Background, String) {
    let servers = (0..2)
        .map(|node| {
            Cluster::netcheck_spawn(&c.host(node), &["serve", &format!("node-{}-host", node + 1)]).unwrap()
        })
        .collect();
    let yaml =
        service(name, cluster_ip, "TCP", 80, extra, &[(NODE_ADDRS[0], "node-1"), (NODE_ADDRS[1], "node-2")]);
    (Background(servers), yaml)
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn granular_checks_services_should_function_for_service_endpoints_using_host_network() {
    let c = cluster();
    let (_servers, yaml) = host_network_endpoints(&c, "hostnet", "10.96.0.83", "  type: NodePort\n");
    let yaml = yaml.replace("      targetPort: 8080\n", "      targetPort: 8080\n      nodePort: 30583\n");
    c.write_manifest("hostnet.yaml", &yaml).unwrap();
    let yaml = service(
        "hostnet-udp",
        "10.96.0.84",
        "UDP",
        53,
        "",
        &[(NODE_ADDRS[0], "node-1"), (NODE_ADDRS[1], "node-2")],
    );
    c.write_manifest("hostnet-udp.yaml", &yaml).unwrap();
    let both = |a: &[String]| {
        let t = tally(a);
        t.keys().all(|k| k == "node-1-host" || k == "node-2-host") && t.len() == 2
    };
    let node_port = 30583;
    // Pods (the endpoint on their own node answers through the egress
    // program), the nodes themselves, and outside through either node.
    let pod = &c.pod("client-pod").ns;
    let far_pod = &c.pod("legacy-x").ns;
    for (who, from) in [("pod on node-1", pod), ("pod on node-2", far_pod)] {
        let answers = http_until(from, "http://10.96.0.83/", who, |a| both(a)).unwrap();
        assert!(both(&answers), "{who}: {:?}", tally(&answers));
        let many = Cluster::http(from, "http://10.96.0.83/", 30).unwrap();
        assert!(both(&many), "{who}: 30 requests, both endpoints, nothing else: {:?}", tally(&many));
        let udp = Cluster::udp(from, "10.96.0.84:53", 20).unwrap();
        let hosts =
            udp.iter().filter(|a| a.starts_with("node-1-host:") || a.starts_with("node-2-host:")).count();
        assert_eq!(hosts, 20, "{who}: UDP through hostNetwork endpoints: {:?}", tally(&udp));
    }
    for node in 0..2 {
        let host = c.host(node);
        let answers = Cluster::http(&host, "http://10.96.0.83/", 30).unwrap();
        assert!(both(&answers), "node-{}: {:?}", node + 1, tally(&answers));
    }
    for addr in NODE_ADDRS {
        let url = format!("http://{addr}:{node_port}/");
        let answers = Cluster::http(&c.client, &url, 30).unwrap();
        assert!(both(&answers), "outside through {addr}: {:?}", tally(&answers));
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_respect_internal_traffic_policy_local_pod_and_node_to_pod_host_network() {
    let c = cluster();
    let (_servers, yaml) =
        host_network_endpoints(&c, "itp-host", "10.96.0.85", "  internalTrafficPolicy: Local\n");
    c.write_manifest("itp-host.yaml", &yaml).unwrap();
    // Each node's clients, pods and the node itself, reach only the
    // endpoint on their own node.
    let node_1 = |a: &[String]| a.iter().all(|x| x == "node-1-host");
    let node_2 = |a: &[String]| a.iter().all(|x| x == "node-2-host");
    eventually(&c.pod("client-pod").ns, "http://10.96.0.85/", "pod on node-1", node_1);
    eventually(&c.pod("legacy-x").ns, "http://10.96.0.85/", "pod on node-2", node_2);
    let from_host_1 = Cluster::http(&c.host(0), "http://10.96.0.85/", 20).unwrap();
    assert!(node_1(&from_host_1), "node-1 itself: {:?}", tally(&from_host_1));
    let from_host_2 = Cluster::http(&c.host(1), "http://10.96.0.85/", 20).unwrap();
    assert!(node_2(&from_host_2), "node-2 itself: {:?}", tally(&from_host_2));
}

/// SCTP through the Services of these scenarios: the pods answer on 5060
/// (`lb-netcheck serve`, raw sockets: the kernel needs no SCTP module) and
/// the clients check every answer's CRC32c (`lb-netcheck sctp`).
fn sctp_service(c: &Cluster, name: &str, cluster_ip: &str, port: u16, extra: &str, eps: &[(&str, &str)]) {
    let yaml = one_port_service(name, cluster_ip, ("SCTP", port, 5060), extra, eps);
    c.write_manifest(&format!("{name}.yaml"), &yaml).unwrap();
}

/// `count` SCTP queries from `from` to `to`, once the Service answers;
/// the answers by pod (`badcrc` and `timeout` kept as they are).
fn sctp_tally(from: &impl Place, to: &str, count: usize) -> std::collections::BTreeMap<String, usize> {
    let up = wait_for(Duration::from_secs(5), || {
        Cluster::netcheck(from, &["sctp", to, "1"]).ok().filter(|a| a[0].contains(":q0"))
    });
    assert!(up.is_some(), "{to} answers SCTP");
    let answers = Cluster::netcheck(from, &["sctp", to, &count.to_string()]).unwrap();
    // `web-a:q3` counts for web-a; `web-a:badcrc` (the pod found the CRC
    // wrong), `badcrc` (the client did) and `timeout` as they are.
    let by_pod: Vec<String> = answers
        .iter()
        .map(|a| match a.split_once(':') {
            Some((pod, query)) if query.starts_with('q') => pod.to_string(),
            _ => a.clone(),
        })
        .collect();
    tally(&by_pod)
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_allow_creating_a_basic_sctp_service_with_pod_and_endpoints() {
    let c = cluster();
    sctp_service(&c, "sctp-basic", "10.96.0.86", 5060, "", &[("10.244.2.10", "node-2")]);
    // The control: SCTP between the pods themselves.
    let direct = Cluster::netcheck(&c.pod("client-pod").ns, &["sctp", "10.244.2.10:5060", "3"]).unwrap();
    assert_eq!(direct, ["web-c:q0", "web-c:q1", "web-c:q2"], "straight to the pod");
    let t = sctp_tally(&c.pod("client-pod").ns, "10.96.0.86:5060", 10);
    assert_eq!(t, [("web-c".to_string(), 10)].into(), "every answer from the endpoint, CRC intact");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn granular_checks_services_should_function_for_pod_service_sctp() {
    let c = cluster();
    // Upstream's ports: the Service's differs from the pods', so the CRC
    // is patched for the ports on the way in and out.
    let eps = [("10.244.1.10", "node-1"), ("10.244.2.10", "node-2")];
    c.write_manifest(
        "sctp-pods.yaml",
        &one_port_service("sctp-pods", "10.96.0.87", ("SCTP", 95, 5060), "  type: NodePort\n", &eps)
            .replace("      targetPort: 5060\n", "      targetPort: 5060\n      nodePort: 30595\n"),
    )
    .unwrap();
    let pod = &c.pod("client-pod").ns;
    let both = |t: &std::collections::BTreeMap<String, usize>| t.keys().eq(["web-a", "web-c"].iter());
    let t = sctp_tally(pod, "10.96.0.87:95", 20);
    assert!(both(&t), "pod → ClusterIP: {t:?}");
    for addr in NODE_ADDRS {
        let to = format!("{addr}:30595");
        let t = sctp_tally(pod, &to, 20);
        assert!(both(&t), "pod → NodePort on {addr}: {t:?}");
        let t = sctp_tally(&c.client, &to, 20);
        assert!(both(&t), "outside → NodePort on {addr}: {t:?}");
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn granular_checks_services_should_function_for_endpoint_service_sctp() {
    let c = cluster();
    let eps = [("10.244.1.10", "node-1"), ("10.244.2.10", "node-2")];
    c.write_manifest(
        "sctp-eps.yaml",
        &one_port_service("sctp-eps", "10.96.0.88", ("SCTP", 95, 5060), "  type: NodePort\n", &eps)
            .replace("      targetPort: 5060\n", "      targetPort: 5060\n      nodePort: 30596\n"),
    )
    .unwrap();
    // From one of the endpoints: it reaches itself (hairpin, source-NATed
    // to the node) and the other.
    let endpoint = &c.pod("web-a").ns;
    let both = |t: &std::collections::BTreeMap<String, usize>| t.keys().eq(["web-a", "web-c"].iter());
    let t = sctp_tally(endpoint, "10.96.0.88:95", 30);
    assert!(both(&t), "endpoint → ClusterIP: {t:?}");
    let t = sctp_tally(endpoint, &format!("{}:30596", NODE_ADDRS[1]), 30);
    assert!(both(&t), "endpoint → NodePort: {t:?}");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_serve_endpoints_on_same_port_and_different_protocol_for_internal_traffic_on_type_load_balancer()
 {
    let c = cluster();
    let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: dual-lb\n  namespace: default\nspec:\n  \
                type: LoadBalancer\n  clusterIP: 10.96.0.89\n  ports:\n    - name: tcp\n      port: 53\n      \
                protocol: TCP\n      targetPort: 8080\n    - name: dns\n      port: 53\n      protocol: UDP\n      \
                targetPort: 5353\nstatus:\n  loadBalancer:\n    ingress:\n      - ip: 198.51.100.89\n---\n\
                apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dual-lb-1\n  \
                namespace: default\n  labels:\n    kubernetes.io/service-name: dual-lb\naddressType: IPv4\nports:\n  \
                - name: tcp\n    port: 8080\n  - name: dns\n    port: 5353\n    protocol: UDP\nendpoints:\n  \
                - addresses: [\"10.244.2.10\"]\n    nodeName: node-2\n";
    c.write_manifest("dual-lb.yaml", yaml).unwrap();
    // Internal traffic: pods on both nodes to the ClusterIP and to the LB
    // IP (kube-proxy short-circuits that in the cluster), both protocols.
    for pod in ["client-pod", "legacy-x"] {
        let ns = &c.pod(pod).ns;
        for addr in ["10.96.0.89", "198.51.100.89"] {
            let tcp = || Cluster::http_probe(ns, &format!("http://{addr}:53/")).as_deref() == Ok("web-c");
            let udp = || Cluster::udp(ns, &format!("{addr}:53"), 1).is_ok_and(|a| a == ["web-c:q0"]);
            let up = wait_for(Duration::from_secs(5), || (tcp() && udp()).then_some(()));
            assert!(up.is_some(), "{pod} → {addr}:53 over TCP and UDP");
        }
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn granular_checks_services_should_update_node_port_udp() {
    let c = cluster();
    let yaml = service("np-udp", "10.96.0.90", "UDP", 53, "  type: NodePort\n", &[("10.244.2.10", "node-2")])
        .replace("      targetPort: 5353\n", "      targetPort: 5353\n      nodePort: 30598\n");
    c.write_manifest("np-udp.yaml", &yaml).unwrap();
    let answers =
        |addr: &str| Cluster::udp(&c.client, &format!("{addr}:30598"), 1).is_ok_and(|a| a == ["web-c:q0"]);
    for addr in NODE_ADDRS {
        let up = wait_for(Duration::from_secs(5), || answers(addr).then_some(()));
        assert!(up.is_some(), "the UDP NodePort through {addr}");
    }
    // Deleted: the node port is released on both nodes.
    std::fs::remove_file(c.manifests.join("np-udp.yaml")).unwrap();
    for addr in NODE_ADDRS {
        let gone = wait_for(Duration::from_secs(5), || (!answers(addr)).then_some(()));
        assert!(gone.is_some(), "the deleted UDP NodePort still answers through {addr}");
    }
    let services = c.inspect(0, "services").unwrap();
    assert!(!services.to_string().contains("30598"), "no frontend left for the node port: {services}");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_internal_traffic_policy_local()
 {
    let c = cluster();
    let terminating = "{ready: false, serving: true, terminating: true}";
    let yaml = with_conditions(
        "local-fallback",
        "10.96.0.91",
        "  internalTrafficPolicy: Local\n",
        &[("10.244.1.10", "node-1", terminating), ("10.244.2.10", "node-2", terminating)],
    );
    c.write_manifest("local-fallback.yaml", &yaml).unwrap();
    // Each node's pods reach their own node's terminating endpoint, and
    // never the other node's.
    eventually(&c.pod("client-pod").ns, "http://10.96.0.91/", "node-1's", |a| a.iter().all(|x| x == "web-a"));
    eventually(&c.pod("legacy-x").ns, "http://10.96.0.91/", "node-2's", |a| a.iter().all(|x| x == "web-c"));
    let many = Cluster::http(&c.pod("client-pod").ns, "http://10.96.0.91/", 20).unwrap();
    assert_eq!(tally(&many).get("web-a"), Some(&20), "{:?}", tally(&many));
}

// The upstream titles the examples' Services answer (`examples/`, loaded
// in every cluster here): one scenario each, named after it.

/// Every answer is one of `pods`, and each of them answered.
fn spread_over(answers: &[String], pods: &[&str], what: &str) {
    let t = tally(answers);
    assert!(t.keys().all(|k| pods.contains(&k.as_str())) && t.len() == pods.len(), "{what}: {t:?}");
}

/// Waits (up to 5 s) until `to` answers `from` over UDP from a pod.
fn udp_answers(from: &impl Place, to: &str) {
    let up = wait_for(Duration::from_secs(5), || {
        Cluster::udp(from, to, 1).ok().filter(|a| a[0].starts_with("web-"))
    });
    assert!(up.is_some(), "{to} answers over UDP");
}

/// `from` reaches `web-nodeport` (10.96.0.11, NodePort 30080) through its
/// ClusterIP and both nodes' NodePorts, each time spread over its two pods.
fn http_through_cluster_ip_and_node_ports(from: &impl Place) {
    http_until(from, "http://10.96.0.11/", "ClusterIP", |a| !a.is_empty()).unwrap();
    spread_over(&Cluster::http(from, "http://10.96.0.11/", 30).unwrap(), &["web-a", "web-c"], "ClusterIP");
    for addr in NODE_ADDRS {
        let url = format!("http://{addr}:30080/");
        spread_over(&Cluster::http(from, &url, 30).unwrap(), &["web-a", "web-c"], &url);
    }
}

/// The same over UDP with `echo-udp` (10.96.0.15:53, NodePort 30053),
/// through the NodePorts of `nodes`.
fn udp_through_cluster_ip_and_node_ports(from: &impl Place, nodes: &[&str]) {
    udp_answers(from, "10.96.0.15:53");
    spread_over(
        &udp_pods(&Cluster::udp(from, "10.96.0.15:53", 30).unwrap()),
        &["web-a", "web-c"],
        "ClusterIP",
    );
    for addr in nodes {
        let to = format!("{addr}:30053");
        spread_over(&udp_pods(&Cluster::udp(from, &to, 30).unwrap()), &["web-a", "web-c"], &to);
    }
}

/// UDP answers (`NAME:q<i>`) by pod.
fn udp_pods(answers: &[String]) -> Vec<String> {
    answers.iter().map(|a| a.split_once(':').map_or(a.as_str(), |(pod, _)| pod).to_string()).collect()
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_serve_multiport_endpoints_from_pods() {
    let c = cluster();
    let pod = &c.pod("client-pod").ns;
    // `multi`: port 80 → the pods' 9090, port 9100 → their 9091.
    let first =
        http_until(pod, "http://10.96.0.13/", "port 80", |a| a.iter().all(|x| x.ends_with(":9090"))).unwrap();
    assert!(!first.is_empty());
    spread_over(
        &Cluster::http(pod, "http://10.96.0.13/", 30).unwrap(),
        &["web-a:9090", "web-c:9090"],
        "port 80",
    );
    spread_over(
        &Cluster::http(pod, "http://10.96.0.13:9100/", 30).unwrap(),
        &["web-a:9091", "web-c:9091"],
        "port 9100",
    );
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_work_after_restarting_kube_proxy() {
    let mut c = cluster();
    let pod = &c.pod("client-pod").ns;
    http_until(pod, "http://10.96.0.10/", "before", |a| !a.is_empty()).unwrap();
    let stream = Cluster::stream(pod, "10.96.0.10:7000", 4).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    restart_agents(&mut c, [&[], &[]]);
    let pod = &c.pod("client-pod").ns;
    spread_over(
        &Cluster::http(pod, "http://10.96.0.10/", 30).unwrap(),
        &["web-a", "web-b", "web-c"],
        "after",
    );
    let out = stream.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the connection across the restart: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_be_able_to_create_a_functioning_node_port_service() {
    let c = cluster();
    for addr in NODE_ADDRS {
        let url = format!("http://{addr}:30080/");
        http_until(&c.client, &url, "the NodePort answers", |a| !a.is_empty()).unwrap();
        spread_over(&Cluster::http(&c.client, &url, 30).unwrap(), &["web-a", "web-c"], &url);
        spread_over(&Cluster::http(&c.pod("client-pod").ns, &url, 30).unwrap(), &["web-a", "web-c"], &url);
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_be_possible_to_connect_to_a_service_via_external_ip_when_the_external_ip_is_not_assigned_to_a_node()
 {
    let c = cluster();
    // 203.0.113.10 is no node's: the client's router sends it to node-1.
    let url = "http://203.0.113.10/";
    http_until(&c.client, url, "the external IP answers", |a| !a.is_empty()).unwrap();
    spread_over(&Cluster::http(&c.client, url, 30).unwrap(), &["web-b", "web-c"], "from outside");
    spread_over(&Cluster::http(&c.pod("client-pod").ns, url, 30).unwrap(), &["web-b", "web-c"], "from a pod");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_not_be_able_to_connect_to_terminating_and_unready_endpoints_if_publish_not_ready_addresses_is_false()
 {
    let c = cluster();
    let gone = "{ready: false, serving: false, terminating: true}";
    let yaml = with_conditions("unready", "10.96.0.92", "", &[("10.244.2.10", "node-2", gone)]);
    c.write_manifest("unready.yaml", &yaml).unwrap();
    let pod = &c.pod("client-pod").ns;
    // Programmed (its ClusterIP refuses at once), and never the endpoint.
    let refused = wait_for(Duration::from_secs(5), || {
        (Cluster::http_once(pod, "http://10.96.0.92/", 1) == Err(7)).then_some(())
    });
    assert!(refused.is_some(), "a terminating, unready endpoint gets no connection");
    for _ in 0..10 {
        assert_eq!(Cluster::http_once(pod, "http://10.96.0.92/", 1), Err(7));
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_have_session_affinity_work_for_node_port_service() {
    let c = cluster();
    for addr in NODE_ADDRS {
        let url = format!("http://{addr}:30091/");
        http_until(&c.client, &url, "the NodePort answers", |a| !a.is_empty()).unwrap();
        let answers = Cluster::http(&c.client, &url, 20).unwrap();
        assert_eq!(tally(&answers).len(), 1, "{url}: one backend for the client: {:?}", tally(&answers));
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_be_rejected_when_no_endpoints_exist() {
    let c = cluster();
    let pod = &c.pod("client-pod").ns;
    // `empty`: refused at once, over TCP and UDP, from a pod and outside.
    let started = std::time::Instant::now();
    assert_eq!(Cluster::http_once(pod, "http://10.96.0.16/", 2), Err(7), "connection refused");
    assert!(started.elapsed() < Duration::from_secs(1), "at once: {:?}", started.elapsed());
    assert_eq!(Cluster::udp(pod, "10.96.0.16:53", 1).unwrap(), ["refused"]);
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_be_rejected_for_evicted_pods_no_endpoints_exist() {
    let c = cluster();
    let pod = &c.pod("client-pod").ns;
    let yaml = service("evicted", "10.96.0.93", "TCP", 80, "", &[("10.244.2.10", "node-2")]);
    c.write_manifest("evicted.yaml", &yaml).unwrap();
    eventually(pod, "http://10.96.0.93/", "before the eviction", |a| a.iter().all(|x| x == "web-c"));
    // The pod is evicted: the slice keeps no endpoint.
    let emptied = yaml.replace("  - addresses: [\"10.244.2.10\"]\n    nodeName: node-2\n", "");
    c.write_manifest("evicted.yaml", &format!("{} []\n", emptied.trim_end())).unwrap();
    let refused = wait_for(Duration::from_secs(5), || {
        (Cluster::http_once(pod, "http://10.96.0.93/", 1) == Err(7)).then_some(())
    });
    assert!(refused.is_some(), "refused once the evicted pod left the slice");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn services_should_respect_internal_traffic_policy_local_pod_host_network_to_pod() {
    let c = cluster();
    let yaml = service(
        "itp-from-host",
        "10.96.0.94",
        "TCP",
        80,
        "  internalTrafficPolicy: Local\n",
        &[("10.244.1.10", "node-1"), ("10.244.2.10", "node-2")],
    );
    c.write_manifest("itp-from-host.yaml", &yaml).unwrap();
    // hostNetwork clients: each node itself reaches its own node's pod only.
    eventually(&c.host(0), "http://10.96.0.94/", "from node-1", |a| a.iter().all(|x| x == "web-a"));
    eventually(&c.host(1), "http://10.96.0.94/", "from node-2", |a| a.iter().all(|x| x == "web-c"));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn networking_granular_checks_services_should_function_for_pod_service_http() {
    let c = cluster();
    http_through_cluster_ip_and_node_ports(&c.pod("client-pod").ns);
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn networking_granular_checks_services_should_function_for_pod_service_udp() {
    let c = cluster();
    udp_through_cluster_ip_and_node_ports(&c.pod("client-pod").ns, &NODE_ADDRS);
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn networking_granular_checks_services_should_function_for_node_service_http() {
    let c = cluster();
    http_through_cluster_ip_and_node_ports(&c.host(0));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn networking_granular_checks_services_should_function_for_node_service_udp() {
    let c = cluster();
    udp_through_cluster_ip_and_node_ports(&c.host(0), &NODE_ADDRS);
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn networking_granular_checks_services_should_function_for_endpoint_service_udp() {
    let c = cluster();
    // From one of the endpoints: itself (hairpin) and the other.
    udp_through_cluster_ip_and_node_ports(&c.pod("web-a").ns, &NODE_ADDRS[1..]);
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn networking_granular_checks_services_should_support_basic_node_port_udp_functionality() {
    let c = cluster();
    for addr in NODE_ADDRS {
        let to = format!("{addr}:30053");
        udp_answers(&c.client, &to);
        spread_over(&udp_pods(&Cluster::udp(&c.client, &to, 30).unwrap()), &["web-a", "web-c"], &to);
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn networking_granular_checks_services_should_function_for_client_ip_based_session_affinity_http() {
    let c = cluster();
    let pod = &c.pod("client-pod").ns;
    http_until(pod, "http://10.96.0.17/", "the ClusterIP answers", |a| !a.is_empty()).unwrap();
    let answers = Cluster::http(pod, "http://10.96.0.17/", 20).unwrap();
    assert_eq!(tally(&answers).len(), 1, "one backend for the pod: {:?}", tally(&answers));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn networking_granular_checks_services_should_be_able_to_handle_large_requests_http() {
    let c = cluster();
    let pod = &c.pod("client-pod").ns;
    http_until(pod, "http://10.96.0.10/", "the ClusterIP answers", |a| !a.is_empty()).unwrap();
    // Upstream echoes 2,000 bytes over HTTP: here a TCP echo checks every
    // byte of 1 KiB writes for two seconds, through each backend.
    for _ in 0..3 {
        let out = Cluster::stream(pod, "10.96.0.10:7000", 2).unwrap().wait_with_output().unwrap();
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success() && line.starts_with("ok "), "echo through the Service: {line}");
    }
}

/// Two zones (node-1: zone-a with web-a and web-b; node-2: zone-b with
/// web-c) and a Service with `trafficDistribution: distribution`, whose
/// slice carries the zone hints the EndpointSlice controller writes.
fn zoned_by(distribution: &str) -> Cluster {
    let mut c = cluster();
    restart_agents(&mut c, [&["--zone", "zone-a"], &["--zone", "zone-b"]]);
    c.write_manifest("zoned.yaml", &ZONED.replace("PreferClose", distribution)).unwrap();
    c
}

/// Pods on both nodes reach only their own zone's endpoints, all of them.
fn each_zone_keeps_its_traffic(c: &Cluster) {
    let zone_a = ["web-a", "web-b"];
    let pod_a = &c.pod("client-pod").ns;
    eventually(pod_a, "http://10.96.0.50/", "zone-a's pod", |a| {
        a.iter().all(|x| zone_a.contains(&x.as_str()))
    });
    spread_over(&Cluster::http(pod_a, "http://10.96.0.50/", 30).unwrap(), &zone_a, "zone-a's pod");
    let pod_b = &c.pod("legacy-x").ns;
    eventually(pod_b, "http://10.96.0.50/", "zone-b's pod", |a| a.iter().all(|x| x == "web-c"));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn traffic_distribution_should_route_traffic_to_an_endpoint_in_the_same_zone_when_using_prefer_close() {
    let c = zoned_by("PreferClose");
    let pod_b = &c.pod("legacy-x").ns;
    eventually(pod_b, "http://10.96.0.50/", "zone-b's pod", |a| a.iter().all(|x| x == "web-c"));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn traffic_distribution_should_route_traffic_correctly_between_pods_on_multiple_nodes_when_using_prefer_close()
 {
    each_zone_keeps_its_traffic(&zoned_by("PreferClose"));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn traffic_distribution_should_route_traffic_to_an_endpoint_in_the_same_zone_when_using_prefer_same_zone() {
    let c = zoned_by("PreferSameZone");
    let pod_b = &c.pod("legacy-x").ns;
    eventually(pod_b, "http://10.96.0.50/", "zone-b's pod", |a| a.iter().all(|x| x == "web-c"));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn traffic_distribution_should_route_traffic_correctly_between_pods_on_multiple_nodes_when_using_prefer_same_zone()
 {
    each_zone_keeps_its_traffic(&zoned_by("PreferSameZone"));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn endpoint_slice_should_support_a_service_with_multiple_endpoint_ips_specified_in_multiple_endpoint_slices()
{
    let c = cluster();
    let one = |slice: &str, addr: &str, node: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice}\n  namespace: default\n  \
             labels:\n    kubernetes.io/service-name: split\naddressType: IPv4\nports:\n  - port: 8080\nendpoints:\n  \
             - addresses: [\"{addr}\"]\n    nodeName: {node}\n"
        )
    };
    let service = service("split", "10.96.0.95", "TCP", 80, "", &[]);
    let service = &service[..service.find("---").unwrap()];
    let yaml = format!(
        "{service}---\n{}---\n{}",
        one("split-1", "10.244.1.10", "node-1"),
        one("split-2", "10.244.2.10", "node-2")
    );
    c.write_manifest("split.yaml", &yaml).unwrap();
    let pod = &c.pod("client-pod").ns;
    http_until(pod, "http://10.96.0.95/", "the Service answers", |a| !a.is_empty()).unwrap();
    spread_over(
        &Cluster::http(pod, "http://10.96.0.95/", 30).unwrap(),
        &["web-a", "web-c"],
        "both slices' endpoints",
    );
}
