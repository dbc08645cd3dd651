//! Real traffic end to end: the namespace cluster of `lb_tests::cluster`,
//! the real agent on each node from `examples/`, real servers in pods and
//! real clients (curl, and `lb-netcheck` for UDP and long streams). Each
//! scenario builds its own cluster. Needs root.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    cluster::{Cluster, NODE_ADDRS, PodSpec, Topology, standard_pods, tally},
    netns::{agent_binary, wait_for},
};
use serde_json::Value;

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn cluster() -> Cluster {
    Cluster::new(&examples(), &standard_pods()).expect("build the namespace cluster")
}

/// The north-south scenarios again on NIC-like links, with XDP forced.
fn nic_like() -> Cluster {
    let c =
        Cluster::with_topology(&examples(), &standard_pods(), Topology::NicLike).expect("build the cluster");
    for node in 0..2 {
        assert!(c.agent_log(node).contains("hook=xdp"), "XDP on node {node}: {}", c.agent_log(node));
    }
    c
}

fn pod_of(addr: &str) -> &'static str {
    match addr {
        "10.244.1.10" => "web-a",
        "10.244.1.11" => "web-b",
        "10.244.2.10" => "web-c",
        other => panic!("unexpected backend {other}"),
    }
}

fn inspect(c: &Cluster, node: usize, what: &str) -> Value {
    c.inspect(node, what).expect("lb-agent inspect")
}

fn assert_all_from(answers: &[String], allowed: &[&str], what: &str) {
    for a in answers {
        assert!(allowed.contains(&a.as_str()), "{what}: unexpected answer {a:?} (all: {:?})", tally(answers));
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn s01_clusterip_from_a_pod_spreads_over_three_replicas() {
    let c = cluster();
    let answers = Cluster::http(&c.pod("client-pod").ns, "http://10.96.0.10/", 300).unwrap();
    let t = tally(&answers);
    // A failure here says what the dataplane saw: drops and events by reason.
    let stats = |node| inspect(&c, node, "stats");
    let (drops_1, drops_2) = (&stats(0)["drops"], &stats(1)["drops"]);
    assert!(
        answers.iter().all(|a| !a.starts_with("error")),
        "ClusterIP: {t:?}; drops on node-1 {drops_1}, on node-2 {drops_2}"
    );
    assert_all_from(&answers, &["web-a", "web-b", "web-c"], "ClusterIP");
    for pod in ["web-a", "web-b", "web-c"] {
        let n = t.get(pod).copied().unwrap_or(0);
        assert!((60..=141).contains(&n), "{pod} answered {n} of 300 (want 20%–47%): {t:?}");
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn s02_nodeport_on_both_nodes_reaches_local_and_remote_backends() {
    nodeport_on_both_nodes_reaches_local_and_remote_backends(&cluster());
}

fn nodeport_on_both_nodes_reaches_local_and_remote_backends(c: &Cluster) {
    for node in NODE_ADDRS {
        // curl checks the replies come from the address it dialed: a reply
        // from any other address would not match its connection.
        let answers = Cluster::http(&c.client, &format!("http://{node}:30080/"), 40).unwrap();
        assert_all_from(&answers, &["web-a", "web-c"], node);
        let t = tally(&answers);
        assert!(t.len() == 2, "via {node}: both the local and the remote backend answer: {t:?}");
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn s03_loadbalancer_ip_and_external_ip_from_outside() {
    loadbalancer_ip_and_external_ip_from_outside(&cluster());
}

fn loadbalancer_ip_and_external_ip_from_outside(c: &Cluster) {
    // Both VIPs are routed to node-1; web-c runs on node-2, so its answers
    // prove the remote path (SNAT, and the reply translated back).
    let lb = Cluster::http(&c.client, "http://198.51.100.10/", 30).unwrap();
    assert_all_from(&lb, &["web-a", "web-c"], "LoadBalancer 198.51.100.10");
    let ext = Cluster::http(&c.client, "http://203.0.113.10/", 30).unwrap();
    assert_all_from(&ext, &["web-b", "web-c"], "externalIP 203.0.113.10");
    for (what, answers) in [("LoadBalancer", &lb), ("externalIP", &ext)] {
        assert!(
            tally(answers).contains_key("web-c"),
            "{what}: the remote backend answers: {:?}",
            tally(answers)
        );
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn s04_multi_port_service_with_named_target_ports() {
    let c = cluster();
    let pod = &c.pod("client-pod").ns;
    let http = Cluster::http(pod, "http://10.96.0.13:80/", 20).unwrap();
    assert_all_from(&http, &["web-a:9090", "web-c:9090"], "port http → http-web-svc (9090)");
    let metrics = Cluster::http(pod, "http://10.96.0.13:9100/", 20).unwrap();
    assert_all_from(&metrics, &["web-a:9091", "web-c:9091"], "port metrics → metrics-svc (9091)");
    let np = Cluster::http(&c.client, &format!("http://{}:30083/", NODE_ADDRS[1]), 10).unwrap();
    assert_all_from(&np, &["web-a:9091", "web-c:9091"], "NodePort 30083");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn s05_selectorless_service_with_hand_written_endpoints() {
    let c = cluster();
    let answers = Cluster::http(&c.pod("client-pod").ns, "http://10.96.0.14/", 10).unwrap();
    assert_all_from(&answers, &["legacy-x"], "selector-less service");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn s06_udp_through_clusterip_and_nodeport() {
    udp_through_clusterip_and_nodeport(&cluster());
}

fn udp_through_clusterip_and_nodeport(c: &Cluster) {
    let answers = Cluster::udp(&c.pod("client-pod").ns, "10.96.0.15:53", 20).unwrap();
    assert_eq!(answers.len(), 20);
    for a in &answers {
        assert!(a.starts_with("web-a:q") || a.starts_with("web-c:q"), "ClusterIP UDP answer {a:?}");
    }
    for node in NODE_ADDRS {
        let answers = Cluster::udp(&c.client, &format!("{node}:30053"), 20).unwrap();
        for a in &answers {
            assert!(a.starts_with("web-a:q") || a.starts_with("web-c:q"), "NodePort UDP via {node}: {a:?}");
        }
        let (local, remote) =
            (answers.iter().any(|a| a.starts_with("web-a")), answers.iter().any(|a| a.starts_with("web-c")));
        assert!(
            local && remote,
            "NodePort UDP via {node}: the local and the remote backend answer: {answers:?}"
        );
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn s07_no_endpoints_refuses_at_once() {
    let c = cluster();
    let pod = &c.pod("client-pod").ns;
    let started = Instant::now();
    let result = Cluster::http_once(pod, "http://10.96.0.16/", 5);
    let elapsed = started.elapsed();
    assert_eq!(result, Err(7), "curl reports 'connection refused' (exit 7)");
    assert!(elapsed < Duration::from_secs(1), "refused at once, not after a timeout: {elapsed:?}");
    assert_eq!(
        Cluster::udp(pod, "10.96.0.16:53", 2).unwrap(),
        vec!["refused", "refused"],
        "UDP port unreachable"
    );
}

/// Sets the `ready` condition of the `web` endpoint at `addr`.
fn set_ready(c: &Cluster, addr: &str, ready: bool) {
    let path = c.manifests.join("01-web-clusterip.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let marker = format!("  - addresses: [\"{addr}\"]\n");
    let at = text.find(&marker).expect("endpoint in the web slice");
    let cond = "conditions: {ready: ";
    let start = at + text[at..].find(cond).expect("conditions") + cond.len();
    let end = start + text[start..].find('}').unwrap();
    let updated = format!("{}{}{}", &text[..start], ready, &text[end..]);
    c.write_manifest("01-web-clusterip.yaml", &updated).unwrap();
}

/// The backend address of the (only) stream from the client pod.
fn stream_backend(c: &Cluster) -> Option<String> {
    let ct = inspect(c, 0, "conntrack");
    ct.as_array()?.iter().find_map(|e| {
        let tuple = e["tuple"].as_str()?;
        (e["direction"] == "request" && tuple.contains("10.244.1.50") && tuple.ends_with("10.96.0.10:7000"))
            .then(|| e["rewrite"].as_str()?.strip_prefix("dst→")?.split(':').next().map(String::from))?
    })
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn s08_not_ready_endpoint_gets_no_new_connections_but_keeps_its_streams() {
    let c = cluster();
    let pod = &c.pod("client-pod").ns;
    let stream = Cluster::stream(pod, "10.96.0.10:7000", 6).unwrap();
    let addr = wait_for(Duration::from_secs(3), || stream_backend(&c)).expect("the stream is tracked");
    let name = pod_of(&addr);

    set_ready(&c, &addr, false);
    std::thread::sleep(Duration::from_secs(1));
    let answers = Cluster::http(pod, "http://10.96.0.10/", 60).unwrap();
    let others: Vec<&str> = ["web-a", "web-b", "web-c"].into_iter().filter(|p| *p != name).collect();
    assert_all_from(&answers, &others, &format!("1 s after {name} turned not ready"));

    let out = stream.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the stream to {name} broke: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    set_ready(&c, &addr, true);
    std::thread::sleep(Duration::from_secs(1));
    let answers = Cluster::http(pod, "http://10.96.0.10/", 60).unwrap();
    assert!(tally(&answers).contains_key(name), "{name} is back once ready: {:?}", tally(&answers));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn s09_external_traffic_policy_local_keeps_the_client_address() {
    external_traffic_policy_local_keeps_the_client_address(&cluster());
}

fn external_traffic_policy_local_keeps_the_client_address(c: &Cluster) {
    let answer = Cluster::http_once(&c.client, &format!("http://{}:30090/whoami", NODE_ADDRS[0]), 3);
    assert_eq!(answer.as_deref(), Ok("web-a 192.0.2.100"), "the backend sees the real client");
    // node-2 has no local endpoint: it drops (curl times out, nothing refuses).
    let answer = Cluster::http_once(&c.client, &format!("http://{}:30090/", NODE_ADDRS[1]), 2);
    assert_eq!(answer, Err(28), "node-2 drops");
    let drops = inspect(c, 1, "stats");
    assert!(drops["drops"]["no_local_endpoint"].as_u64().unwrap_or(0) > 0, "counted as a drop: {drops}");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn s10_session_affinity_keeps_each_client_on_one_backend() {
    session_affinity_keeps_each_client_on_one_backend(&cluster());
}

fn session_affinity_keeps_each_client_on_one_backend(c: &Cluster) {
    let url = format!("http://{}:30091/", NODE_ADDRS[0]);
    for client in [&c.client, &c.client2] {
        let answers = Cluster::http(client, &url, 20).unwrap();
        let t = tally(&answers);
        assert_eq!(t.len(), 1, "one client, one backend: {t:?}");
        assert_all_from(&answers, &["web-a", "web-b", "web-c"], "affinity");
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn s11_agent_restart_keeps_streams_and_new_connections_working() {
    let mut c = cluster();
    let pod_ns = c.pod("client-pod").ns.name.clone();
    let stream = Cluster::stream(&c.pod("client-pod").ns, "10.96.0.10:7000", 8).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // Stop node-1's agent (as a rolling update does), use the service
    // while it is away, then start the new one.
    c.agents[0].take().expect("agent").stop().unwrap();
    let during = Cluster::http(&c.pod("client-pod").ns, "http://10.96.0.10/", 20).unwrap();
    assert_all_from(&during, &["web-a", "web-b", "web-c"], "while the agent is stopped");
    let agent = c.start_agent(0).unwrap();
    c.agents[0] = Some(agent);
    c.wait_synced().unwrap();
    assert!(c.agent_log(0).contains("adopted the maps"), "{}", c.agent_log(0));
    let after = Cluster::http(&c.pod("client-pod").ns, "http://10.96.0.10/", 20).unwrap();
    assert_all_from(&after, &["web-a", "web-b", "web-c"], "after the restart");
    let out = stream.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stream from {pod_ns} broke: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes: u64 = stdout.trim().strip_prefix("ok ").and_then(|b| b.parse().ok()).unwrap_or(0);
    assert!(bytes > 100_000, "every byte echoed across the restart ({bytes} bytes)");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn s12_headless_and_externalname_have_no_frontends_and_no_errors() {
    let c = cluster();
    let dry = Command::new(agent_binary())
        .args(["run", "--manifests"])
        .arg(&c.manifests)
        .args(["--node-name", "node-1", "--external-interface", "eth0", "--node-address", NODE_ADDRS[0]])
        .arg("--dry-run")
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dry.stdout);
    assert!(!dump.contains("default/db ") && !dump.contains("external-db"), "{dump}");
    assert!(!dump.contains("note:") && !dump.contains("error:"), "{dump}");
    let programmed = inspect(&c, 0, "services");
    let frontends =
        dump.lines().filter(|l| !l.starts_with(' ') && !l.starts_with("healthCheckNodePort")).count();
    assert_eq!(programmed.as_array().unwrap().len(), frontends, "maps hold exactly the dry run's frontends");
    let log = c.agent_log(0);
    assert!(!log.contains("WARN") && !log.contains("ERROR"), "{log}");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn s13_a_pod_interface_created_later_is_served() {
    let mut c = cluster();
    c.add_pod(PodSpec::new("late-client", 0, "10.244.1.60")).unwrap();
    let late = &c.pod("late-client").ns;
    let served = wait_for(Duration::from_secs(5), || {
        let answers = Cluster::http(late, "http://10.96.0.10/", 3).ok()?;
        answers.iter().all(|a| a.starts_with("web-")).then_some(answers)
    });
    assert!(served.is_some(), "the new pod reaches the ClusterIP; agent log:\n{}", c.agent_log(0));
    assert!(c.agent_log(0).contains("lb_tc_pod@lbp-"), "the TC link of the new pod: {}", c.agent_log(0));
}

/// One sample of a Prometheus text exposition, by metric name and a label substring.
fn sample(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn s14_metrics_move_with_traffic() {
    let c = cluster();
    let scrape = || {
        let out =
            c.nodes[0].cmd("curl").args(["-s", "-m", "2", "http://127.0.0.1:9960/metrics"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let label = "frontend=\"10.96.0.10:80/TCP\"";
    let before = scrape();
    assert!(before.contains("lb_build_info"), "{before}");
    let packets_before = sample(&before, "lb_frontend_packets_total", label).unwrap_or(0.0);
    Cluster::http(&c.pod("client-pod").ns, "http://10.96.0.10/", 20).unwrap();
    let after = scrape();
    let packets = sample(&after, "lb_frontend_packets_total", label).expect("per-frontend packets");
    let conns = sample(&after, "lb_frontend_new_connections_total", label).expect("new connections");
    assert!(
        packets >= packets_before + 100.0,
        "20 requests are at least 100 packets: {packets_before} → {packets}"
    );
    assert!(conns >= 20.0, "{conns} new connections");
    assert!(after.contains("service=\"default/web\""), "service label: {after}");
    assert!(sample(&after, "lb_conntrack_entries", "").unwrap_or(0.0) >= 40.0, "two entries per flow");
    assert!(sample(&after, "lb_map_capacity", "lb_conntrack").unwrap_or(0.0) > 0.0);
    assert_eq!(
        sample(&after, "lb_frontends", ""),
        Some(inspect(&c, 0, "services").as_array().unwrap().len() as f64)
    );
    for (path, want) in [("/healthz", "ok"), ("/readyz", "ok")] {
        let out = c.nodes[0]
            .cmd("curl")
            .args(["-s", "-m", "2"])
            .arg(format!("http://{}:9961{path}", NODE_ADDRS[0]))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want, "{path}");
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn s15_health_check_node_port_answers_like_kube_proxy() {
    let c = cluster();
    let get = |node: &str| {
        let out = c
            .client
            .cmd("curl")
            .args(["-s", "-m", "2", "-w", "\n%{http_code}"])
            .arg(format!("http://{node}:32090/"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_string(), serde_json::from_str::<Value>(body).unwrap_or(Value::Null))
    };
    let (code, body) = get(NODE_ADDRS[0]);
    assert_eq!(code, "200", "node-1 has a local endpoint: {body}");
    assert_eq!(body["localEndpoints"], 1);
    assert_eq!(body["service"]["name"], "local");
    let (code, body) = get(NODE_ADDRS[1]);
    assert_eq!(code, "503", "node-2 has none: {body}");
    assert_eq!(body["localEndpoints"], 0);
}

/// externalTrafficPolicy Local binds outside clients to the node they came
/// to; pods are subject to neither policy (kube-proxy's "pod traffic for
/// external destinations"): from node-2, which has no endpoint of `local`,
/// a pod reaches its NodePort, LoadBalancer IP and external IP, while an
/// outside client through node-2 is still dropped.
#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn s16_pods_reach_local_policy_frontends_from_a_node_without_endpoints() {
    let mut c = cluster();
    c.add_pod(PodSpec::new("client-2", 1, "10.244.2.50")).unwrap();
    let pod = &c.pod("client-2").ns;
    for url in [
        format!("http://{}:30090/", NODE_ADDRS[1]),
        "http://198.51.100.19/".into(),
        "http://203.0.113.19/".into(),
    ] {
        let answers = Cluster::http(pod, &url, 5).unwrap();
        assert_all_from(&answers, &["web-a"], &url);
    }
    let answer = Cluster::http_once(&c.client, &format!("http://{}:30090/", NODE_ADDRS[1]), 2);
    assert_eq!(answer, Err(28), "node-2 still drops outside clients");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn x02_nodeport_on_both_nodes_reaches_local_and_remote_backends_nic_like() {
    nodeport_on_both_nodes_reaches_local_and_remote_backends(&nic_like());
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn x03_loadbalancer_ip_and_external_ip_from_outside_nic_like() {
    loadbalancer_ip_and_external_ip_from_outside(&nic_like());
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn x06_udp_through_clusterip_and_nodeport_nic_like() {
    udp_through_clusterip_and_nodeport(&nic_like());
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn x09_external_traffic_policy_local_keeps_the_client_address_nic_like() {
    external_traffic_policy_local_keeps_the_client_address(&nic_like());
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn x10_session_affinity_keeps_each_client_on_one_backend_nic_like() {
    session_affinity_keeps_each_client_on_one_backend(&nic_like());
}

/// Restarting an agent with another `--acceleration` switches the hook on
/// the running node (the new one attached before the old one goes, both
/// sharing the conntrack table): a stream through a NodePort to a backend on
/// the other node, opened under XDP, carries on under TC, every byte echoed.
#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn x17_switching_the_hook_keeps_established_flows() {
    let mut c = nic_like();
    let echo = r#"
apiVersion: v1
kind: Service
metadata: {name: echo-np, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.30
  ports: [{port: 7000, targetPort: 7000, nodePort: 30700}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-np-1, namespace: default, labels: {kubernetes.io/service-name: echo-np}}
addressType: IPv4
ports: [{port: 7000}]
endpoints: [{addresses: ["10.244.2.10"], nodeName: node-2}]
"#;
    c.write_manifest("30-echo-np.yaml", echo).unwrap();
    let to = format!("{}:30700", NODE_ADDRS[0]);
    let programmed = wait_for(Duration::from_secs(5), || {
        inspect(&c, 0, "services").as_array()?.iter().any(|s| s["frontend"] == "*:30700/TCP").then_some(())
    });
    assert!(programmed.is_some(), "{}", c.agent_log(0));
    let stream = Cluster::stream(&c.client, &to, 6).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    c.agents[0].take().expect("agent").stop().unwrap();
    c.agents[0] = Some(c.start_agent_with(0, "tc").unwrap());
    c.wait_synced().unwrap();
    let log = c.agent_log(0);
    assert!(log.contains("switched the north-south hook") && log.contains("hook=tc"), "{log}");
    let hooks = inspect(&c, 0, "interfaces");
    let eth0: Vec<&Value> = hooks.as_array().unwrap().iter().filter(|i| i["interface"] == "eth0").collect();
    let ingress: Vec<&&Value> = eth0.iter().filter(|i| i["hook"] != "egress").collect();
    assert_eq!(ingress.len(), 1, "one north-south hook on eth0: {hooks}");
    assert_eq!(ingress[0]["hook"], "tc");
    assert_eq!(eth0.len(), 2, "and the egress program: {hooks}");
    let out = stream.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the stream broke: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    // New connections work under TC as well.
    let answers = Cluster::http(&c.client, &format!("http://{}:30080/", NODE_ADDRS[0]), 20).unwrap();
    assert_all_from(&answers, &["web-a", "web-c"], "after the switch");
}
