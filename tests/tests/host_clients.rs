//! Clients in a node's own network namespace (the kubelet, hostNetwork
//! pods, the agent itself) through the socket hooks: every frontend kind
//! answers as it does for pods. Each node's agent attaches its hooks to
//! that node's cgroup, a child the test made (never the machine's root),
//! and the "host" processes run inside it. Needs root.

use std::{
    io::Read as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    cluster::{Cluster, NODE_ADDRS, http_until, one_port_service, standard_pods, tally},
    fake_api::{FakeApi, node, service_cidr},
    netns::{Agent, HostProcess, TempDir, agent_binary, wait_for},
};
use serde_json::json;

fn cluster() -> Cluster {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    Cluster::new(&examples, &standard_pods()).expect("build the namespace cluster")
}

fn answers_from(answers: &[String], allowed: &[&str], what: &str) {
    for a in answers {
        assert!(allowed.contains(&a.as_str()), "{what}: unexpected answer {a:?} (all: {:?})", tally(answers));
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn h01_the_node_reaches_a_cluster_ip_spread_over_its_replicas() {
    let c = cluster();
    let answers = Cluster::http(&c.host(0), "http://10.96.0.10/", 60).unwrap();
    answers_from(&answers, &["web-a", "web-b", "web-c"], "ClusterIP from the host");
    assert_eq!(tally(&answers).len(), 3, "all three replicas answer: {:?}", tally(&answers));
    // The same from node-2, whose replicas are mostly remote.
    let answers = Cluster::http(&c.host(1), "http://10.96.0.10/", 30).unwrap();
    answers_from(&answers, &["web-a", "web-b", "web-c"], "ClusterIP from node-2");
    // Without the hooks (a process outside the node's cgroup) nothing translates.
    assert_eq!(
        Cluster::http_once(&c.nodes[0], "http://10.96.0.10/", 1),
        Err(28),
        "control: no hook, no answer"
    );
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn h02_the_node_reaches_its_node_port_on_its_address_and_on_loopback() {
    let c = cluster();
    for url in [format!("http://{}:30080/", NODE_ADDRS[0]), "http://127.0.0.1:30080/".into()] {
        let answers = Cluster::http(&c.host(0), &url, 20).unwrap();
        answers_from(&answers, &["web-a", "web-c"], &url);
    }
    // Another node's NodePort goes over the network to that node's hook.
    let answers = Cluster::http(&c.host(0), &format!("http://{}:30080/", NODE_ADDRS[1]), 10).unwrap();
    answers_from(&answers, &["web-a", "web-c"], "node-2's NodePort from node-1");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn h03_the_node_reaches_load_balancer_ips_and_external_ips() {
    let c = cluster();
    for url in ["http://198.51.100.10/", "http://203.0.113.10/"] {
        for node in 0..2 {
            let answers = Cluster::http(&c.host(node), url, 20).unwrap();
            answers_from(&answers, &["web-a", "web-b", "web-c"], url);
        }
    }
    // externalTrafficPolicy Local: in-cluster clients get the cluster's
    // endpoints, also on a node without a local one (node-2 here).
    let answers = Cluster::http(&c.host(1), "http://198.51.100.19/", 10).unwrap();
    assert!(!answers.iter().any(|a| a.starts_with("error")), "eTP=Local LB IP from node-2: {answers:?}");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn h04_no_endpoints_refuses_the_connect_at_once() {
    let c = cluster();
    let out = Cluster::netcheck(&c.host(0), &["connect", "10.96.0.16:80"]).unwrap();
    let fields: Vec<&str> = out[0].split_whitespace().collect();
    assert_eq!(fields[0], "refused", "{out:?}");
    let ms: u64 = fields[1].parse().unwrap();
    assert!(ms < 100, "refused within 100 ms, took {ms} ms");
    // A Service with endpoints on the same node still connects.
    let out = Cluster::netcheck(&c.host(0), &["connect", "10.96.0.10:80"]).unwrap();
    assert!(out[0].starts_with("ok "), "{out:?}");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn h05_udp_replies_come_from_the_service_address_and_getpeername_gives_it() {
    let c = cluster();
    // Unconnected: each datagram translated at sendmsg, each reply's
    // source given back at recvmsg.
    let out = Cluster::netcheck(&c.host(0), &["udp-from", "10.96.0.15:53", "10"]).unwrap();
    assert_eq!(out.len(), 10);
    for line in &out {
        let (answer, from) = line.split_once(' ').unwrap_or((line, ""));
        assert!(answer.starts_with("web-a:q") || answer.starts_with("web-c:q"), "{out:?}");
        assert_eq!(from, "10.96.0.15:53", "the reply's source is the service: {out:?}");
    }
    // Connected UDP, and the NodePort on loopback.
    let out = Cluster::udp(&c.host(0), "127.0.0.1:30053", 5).unwrap();
    assert!(out.iter().all(|a| a.starts_with("web-a:") || a.starts_with("web-c:")), "{out:?}");
    assert_eq!(Cluster::netcheck(&c.host(0), &["udp-peer", "10.96.0.15:53"]).unwrap(), ["10.96.0.15:53"]);
    let out = Cluster::netcheck(&c.host(0), &["connect", "10.96.0.10:80"]).unwrap();
    assert!(out[0].starts_with("ok ") && out[0].ends_with(" 10.96.0.10:80"), "TCP getpeername: {out:?}");
    // Dual-stack sockets name IPv4 services as `::ffff:a.b.c.d` (Java's
    // default): the IPv6 hooks serve them the same way.
    let out = Cluster::netcheck(&c.host(0), &["connect", "[::ffff:10.96.0.10]:80"]).unwrap();
    assert!(
        out[0].starts_with("ok ") && out[0].ends_with(" [::ffff:10.96.0.10]:80"),
        "v4-mapped TCP: {out:?}"
    );
    let out = Cluster::netcheck(&c.host(0), &["udp-from", "[::ffff:10.96.0.15]:53", "3"]).unwrap();
    for line in &out {
        assert!(line.ends_with(" [::ffff:10.96.0.15]:53") && line.contains(":q"), "v4-mapped UDP: {out:?}");
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn h06_affinity_and_internal_traffic_policy_local_from_the_host() {
    let c = cluster();
    let sticky = Cluster::http(&c.host(0), "http://10.96.0.17/", 20).unwrap();
    assert_eq!(tally(&sticky).len(), 1, "ClientIP affinity keeps one backend: {:?}", tally(&sticky));
    let eps = [("10.244.1.10", "node-1"), ("10.244.2.10", "node-2")];
    let local = one_port_service(
        "local-only",
        "10.96.0.40",
        ("TCP", 80, 8080),
        "  internalTrafficPolicy: Local\n",
        &eps,
    );
    c.write_manifest("itp-local.yaml", &local).unwrap();
    let node1 = http_until(&c.host(0), "http://10.96.0.40/", "iTP=Local on node-1", |a| {
        a.iter().all(|x| x == "web-a")
    })
    .unwrap();
    assert_eq!(node1.len(), 6);
    http_until(&c.host(1), "http://10.96.0.40/", "iTP=Local on node-2", |a| a.iter().all(|x| x == "web-c"))
        .unwrap();
    // No local endpoint: kube-proxy drops; the socket hook fails the
    // connect() at once instead of letting it time out.
    let eps = [("10.244.1.10", "node-1")];
    let here = one_port_service(
        "local-here",
        "10.96.0.42",
        ("TCP", 80, 8080),
        "  internalTrafficPolicy: Local\n",
        &eps,
    );
    c.write_manifest("itp-local-here.yaml", &here).unwrap();
    let failed = wait_for(Duration::from_secs(5), || {
        let out = Cluster::netcheck(&c.host(1), &["connect", "10.96.0.42:80"]).ok()?;
        // Until the agent has the Service, the connect() times out.
        out[0].contains("No route to host").then_some(out)
    })
    .expect("node-2 has no endpoint of an iTP=Local service: connect() fails with EHOSTUNREACH");
    let ms: u64 = failed[0].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(ms < 100, "failed at once: {failed:?}");
    let ok = Cluster::netcheck(&c.host(0), &["connect", "10.96.0.42:80"]).unwrap();
    assert!(ok[0].starts_with("ok "), "node-1 has the endpoint: {ok:?}");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn h07_a_connected_udp_socket_to_a_removed_backend_is_terminated_within_a_second() {
    let c = cluster();
    let only = |addr: &str, node: &str| {
        one_port_service("dns-hold", "10.96.0.41", ("UDP", 53, 5353), "", &[(addr, node)])
    };
    c.write_manifest("dns-hold.yaml", &only("10.244.1.10", "node-1")).unwrap();
    let ready = wait_for(Duration::from_secs(5), || {
        let out = Cluster::udp(&c.host(0), "10.96.0.41:53", 1).ok()?;
        (out == ["web-a:q0"]).then_some(())
    });
    assert!(ready.is_some(), "the UDP service answers");
    let started = Instant::now();
    let mut hold = Cluster::netcheck_spawn(&c.host(0), &["udp-hold", "10.96.0.41:53", "3500"]).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    // web-a leaves the slice (the pod itself still answers: only the
    // socket's termination moves the client).
    c.write_manifest("dns-hold.yaml", &only("10.244.2.10", "node-2")).unwrap();
    let changed_ms = started.elapsed().as_millis() as u64;
    let mut out = String::new();
    hold.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(hold.wait().unwrap().success(), "{out}");
    let lines: Vec<(u64, &str)> =
        out.lines().filter_map(|l| l.split_once(' ')).map(|(ms, a)| (ms.parse().unwrap(), a)).collect();
    assert!(lines.iter().any(|(_, a)| a.starts_with("web-a:")), "talking to web-a first: {out}");
    let first_c = lines.iter().find(|(_, a)| a.starts_with("web-c:")).map(|(ms, _)| *ms);
    let Some(first_c) = first_c else { panic!("never moved to the live backend: {out}") };
    assert!(
        first_c.saturating_sub(changed_ms) <= 1000,
        "moved {} ms after the change: {out}",
        first_c - changed_ms
    );
    let after: Vec<&&str> = lines.iter().filter(|(ms, _)| *ms > first_c).map(|(_, a)| a).collect();
    assert!(after.iter().all(|a| a.starts_with("web-c:")), "only the live backend afterwards: {out}");
    assert!(out.contains("error"), "the old socket failed: {out}");
    let metrics = c.agent_log(0);
    assert!(metrics.contains("terminated UDP sockets connected to gone backends"), "{metrics}");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn h08_host_connections_keep_working_across_an_agent_restart() {
    let mut c = cluster();
    let stream = Cluster::netcheck_spawn(&c.host(0), &["stream", "10.96.0.10:7000", "4"]).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    c.agents[0].take().unwrap().stop().unwrap();
    // Stopped: the pinned hooks still translate new connections.
    let down = Cluster::http(&c.host(0), "http://10.96.0.10/", 10).unwrap();
    answers_from(&down, &["web-a", "web-b", "web-c"], "with the agent stopped");
    c.agents[0] = Some(c.start_agent(0).unwrap());
    c.wait_synced().unwrap();
    let up = Cluster::http(&c.host(0), "http://10.96.0.10/", 10).unwrap();
    answers_from(&up, &["web-a", "web-b", "web-c"], "after the restart");
    let out = stream.wait_with_output().unwrap();
    assert!(out.status.success(), "the stream broke: {}", String::from_utf8_lossy(&out.stderr));
    // The restart swapped its programs into the same links: one of each.
    let cgroup = &c.cgroups[0].dir;
    let show = Command::new("bpftool").args(["cgroup", "show"]).arg(cgroup).output().unwrap();
    let text = String::from_utf8_lossy(&show.stdout);
    for hook in [
        "inet4_connect",
        "udp4_sendmsg",
        "udp4_recvmsg",
        "inet4_getpeername",
        "inet6_connect",
        "udp6_sendmsg",
        "udp6_recvmsg",
        "inet6_getpeername",
    ] {
        assert_eq!(
            text.lines().filter(|l| l.contains(hook)).count(),
            1,
            "{hook} once on the cgroup:\n{text}"
        );
    }
    let links = Command::new(agent_binary())
        .args(["inspect", "interfaces", "--pin-dir"])
        .arg(c.pin_dir(0))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&links.stdout).contains("socket"), "inspect lists the socket hooks");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn h09_socket_lb_all_serves_pods_at_connect_and_off_detaches() {
    let mut c = cluster();
    c.agents[0].take().unwrap().stop().unwrap();
    c.agents[0] = Some(c.start_agent_args(0, &["--socket-lb", "all"]).unwrap());
    c.wait_synced().unwrap();
    let pod = HostProcess { ns: &c.pod("client-pod").ns, cgroup: &c.cgroups[0] };
    let answers = Cluster::http(&pod, "http://10.96.0.10/", 20).unwrap();
    answers_from(&answers, &["web-a", "web-b", "web-c"], "a pod through the socket hooks");
    // Translated at connect(): the pod's packets carry the backend's
    // address, so the pod hook tracks no flow for them.
    let ct = Command::new(agent_binary())
        .args(["inspect", "conntrack", "-o", "json", "--pin-dir"])
        .arg(c.pin_dir(0))
        .output()
        .unwrap();
    let ct = String::from_utf8_lossy(&ct.stdout);
    assert!(!ct.contains("10.244.1.50"), "no per-packet NAT for the pod's connections: {ct}");
    // `off`: the hooks go, the node's own clients lose the ClusterIP.
    c.agents[0].take().unwrap().stop().unwrap();
    c.agents[0] = Some(c.start_agent_args(0, &["--socket-lb", "off"]).unwrap());
    c.wait_synced().unwrap();
    assert_eq!(
        Cluster::http_once(&c.host(0), "http://10.96.0.10/", 1),
        Err(28),
        "no hooks with --socket-lb off"
    );
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn h10_with_kube_proxy_gone_the_agent_dials_the_api_server_itself_and_serves_its_cluster_ip() {
    let mut c = cluster();
    // The API server runs on node-1's address, like a control-plane node's;
    // the `kubernetes` Service fronts it at 10.96.0.1:443.
    let api = FakeApi::default();
    let listener = c.nodes[0].enter(|| std::net::TcpListener::bind((NODE_ADDRS[0], 6443))).unwrap().unwrap();
    let _served = api.serve(listener).unwrap();
    api.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "targetPort": 6443}]}}));
    api.apply(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4", "ports": [{"name": "https", "port": 6443}],
        "endpoints": [{"addresses": [NODE_ADDRS[0]]}]}));
    api.apply(node("node-1", NODE_ADDRS[0], "zone-a"));
    // In-cluster settings name the ClusterIP, which nothing translates yet.
    let dir = TempDir::new("kc").unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://10.96.0.1:443\n\
         contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user: {}\n",
    )
    .unwrap();
    assert_eq!(
        Cluster::http_once(&c.host(0), "http://10.96.0.1:443/api/v1/services", 1),
        Err(28),
        "not yet served"
    );
    c.agents[0].take().unwrap().stop().unwrap();
    let pin = c.pin_dir(0).to_string_lossy().into_owned();
    let cgroup = c.cgroups[0].dir.to_string_lossy().into_owned();
    let api_server = format!("http://{}:6443", NODE_ADDRS[0]);
    let args = [
        "run",
        "--kubernetes",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--api-server",
        &api_server,
        "--node-name",
        "node-1",
        "--external-interface",
        "eth0",
        "--pin-dir",
        &pin,
        "--cgroup-root",
        &cgroup,
    ];
    let agent = Agent::start_in(&c.nodes[0], &args, Some(&c.cgroups[0])).unwrap();
    let synced = wait_for(Duration::from_secs(15), || agent.log().contains("synced").then_some(()));
    assert!(synced.is_some(), "the agent reached the API server by its own address:\n{}", agent.log());
    assert!(agent.log().contains(&api_server), "{}", agent.log());
    // Now the node's clients (the kubelet, hostNetwork daemons) reach the
    // API server through its ClusterIP.
    let answer = Cluster::http_once(&c.host(0), "http://10.96.0.1:443/api/v1/services", 2).unwrap();
    assert!(answer.contains("\"ServiceList\"") && answer.contains("kubernetes"), "{answer}");
    // The cluster's ServiceCIDR, with no --service-cidr given, is the
    // ClusterIP catch-all's range: an address of it without a Service is
    // unreachable at once (without the catch-all, the node's default route
    // leads nowhere: a timeout, or a failed neighbour lookup after a second
    // or more), the ClusterIP's unused ports refused.
    let connect = |to: &str| Cluster::netcheck(&c.host(0), &["connect", to]).unwrap()[0].clone();
    let millis = |line: &str| line.split_whitespace().nth(1).and_then(|ms| ms.parse::<u64>().ok());
    let before = connect("10.96.0.77:80");
    assert!(millis(&before).is_some_and(|ms| ms >= 1000), "no catch-all yet: {before}");
    api.apply(service_cidr("kubernetes", &["10.96.0.0/12"]));
    let caught = wait_for(Duration::from_secs(5), || {
        let unallocated = connect("10.96.0.77:80");
        let at_once =
            unallocated.contains("No route to host") && millis(&unallocated).is_some_and(|ms| ms < 100);
        at_once.then_some(unallocated)
    });
    assert!(caught.is_some(), "the ServiceCIDR's unallocated address:\n{}", agent.log());
    assert!(connect("10.96.0.1:80").starts_with("refused"), "the ClusterIP's unused port");
    c.agents[0] = Some(agent);
}
