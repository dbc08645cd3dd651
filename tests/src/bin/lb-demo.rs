//! `cargo xtask demo`: a two-node cluster in network namespaces, the agent
//! on each node from `examples/`, real traffic to every frontend, and what
//! answered. Everything is removed at the end (also on Ctrl-C).

use std::{path::Path, process::Command, time::Instant};

use anyhow::Result;
use lb_tests::{
    cluster::{Cluster, NODE_ADDRS, standard_pods, tally},
    netns::{HostProcess, Netns, agent_binary},
};

/// Who sends: a namespace (a pod, an outside client), or a node's own
/// processes (through the socket hooks).
enum From<'a> {
    Ns(&'a Netns),
    Host(HostProcess<'a>),
}

enum Probe<'a> {
    Http { from: From<'a>, url: String, count: usize },
    Udp { from: From<'a>, to: String, count: usize },
}

struct Row {
    service: &'static str,
    frontend: String,
    client: &'static str,
    result: String,
}

fn run(probe: &Probe) -> Result<String> {
    let answers = match probe {
        Probe::Http { from: From::Ns(ns), url, count } => Cluster::http(ns, url, *count)?,
        Probe::Http { from: From::Host(host), url, count } => Cluster::http(host, url, *count)?,
        Probe::Udp { from, to, count } => match from {
            From::Ns(ns) => Cluster::udp(ns, to, *count)?,
            From::Host(host) => Cluster::udp(host, to, *count)?,
        }
        .into_iter()
        .map(|a| a.split(':').next().unwrap_or(&a).to_string())
        .collect(),
    };
    let t = tally(&answers);
    Ok(t.iter()
        .map(|(who, n)| {
            let who = match who.as_str() {
                "" | "error 28" | "timeout" => "no answer",
                "error 7" | "refused" => "refused",
                w => w,
            };
            format!("{who}×{n}")
        })
        .collect::<Vec<_>>()
        .join("  "))
}

fn http(from: &Netns, url: String, count: usize) -> Probe<'_> {
    Probe::Http { from: From::Ns(from), url, count }
}

fn main() -> Result<()> {
    let started = Instant::now();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    println!("Building the cluster: client, switch, node-1, node-2 and 5 pods in network namespaces;");
    println!("lb-agent runs on each node from {}.\n", examples.canonicalize()?.display());
    let c = Cluster::new(&examples, &standard_pods())?;
    let pod = &c.pod("client-pod").ns;
    let (n1, n2) = (NODE_ADDRS[0], NODE_ADDRS[1]);

    let plan: Vec<(&str, String, &str, Probe)> = vec![
        ("web", "10.96.0.10:80 ClusterIP".into(), "client-pod", http(pod, "http://10.96.0.10/".into(), 30)),
        (
            "web-nodeport",
            format!("{n1}:30080 NodePort"),
            "client",
            http(&c.client, format!("http://{n1}:30080/"), 20),
        ),
        (
            "web-nodeport",
            format!("{n2}:30080 NodePort"),
            "client",
            http(&c.client, format!("http://{n2}:30080/"), 20),
        ),
        (
            "web-lb",
            "198.51.100.10:80 LoadBalancer".into(),
            "client",
            http(&c.client, "http://198.51.100.10/".into(), 20),
        ),
        (
            "web-external",
            "203.0.113.10:80 externalIP".into(),
            "client",
            http(&c.client, "http://203.0.113.10/".into(), 20),
        ),
        (
            "multi",
            "10.96.0.13:80 → http-web-svc".into(),
            "client-pod",
            http(pod, "http://10.96.0.13/".into(), 10),
        ),
        (
            "multi",
            "10.96.0.13:9100 → metrics-svc".into(),
            "client-pod",
            http(pod, "http://10.96.0.13:9100/".into(), 10),
        ),
        (
            "legacy",
            "10.96.0.14:80 (hand-written Endpoints)".into(),
            "client-pod",
            http(pod, "http://10.96.0.14/".into(), 10),
        ),
        (
            "echo-udp",
            "10.96.0.15:53/UDP ClusterIP".into(),
            "client-pod",
            Probe::Udp { from: From::Ns(pod), to: "10.96.0.15:53".into(), count: 10 },
        ),
        (
            "echo-udp",
            format!("{n2}:30053/UDP NodePort"),
            "client",
            Probe::Udp { from: From::Ns(&c.client), to: format!("{n2}:30053"), count: 10 },
        ),
        (
            "empty",
            "10.96.0.16:80 (no endpoints)".into(),
            "client-pod",
            http(pod, "http://10.96.0.16/".into(), 3),
        ),
        (
            "local",
            format!("{n1}:30090 eTP=Local"),
            "client",
            http(&c.client, format!("http://{n1}:30090/whoami"), 3),
        ),
        (
            "local",
            format!("{n2}:30090 eTP=Local"),
            "client",
            http(&c.client, format!("http://{n2}:30090/"), 1),
        ),
        (
            "sticky",
            format!("{n1}:30091 ClientIP affinity"),
            "client",
            http(&c.client, format!("http://{n1}:30091/"), 15),
        ),
        (
            "sticky",
            format!("{n1}:30091 ClientIP affinity"),
            "client2",
            http(&c.client2, format!("http://{n1}:30091/"), 15),
        ),
        (
            "web",
            "10.96.0.10:80 ClusterIP".into(),
            "node-1",
            Probe::Http { from: From::Host(c.host(0)), url: "http://10.96.0.10/".into(), count: 30 },
        ),
        (
            "web-nodeport",
            "127.0.0.1:30080 NodePort".into(),
            "node-1",
            Probe::Http { from: From::Host(c.host(0)), url: "http://127.0.0.1:30080/".into(), count: 20 },
        ),
        (
            "echo-udp",
            "10.96.0.15:53/UDP ClusterIP".into(),
            "node-2",
            Probe::Udp { from: From::Host(c.host(1)), to: "10.96.0.15:53".into(), count: 10 },
        ),
        (
            "empty",
            "10.96.0.16:80 (no endpoints)".into(),
            "node-2",
            Probe::Http { from: From::Host(c.host(1)), url: "http://10.96.0.16/".into(), count: 3 },
        ),
    ];
    let mut rows = Vec::new();
    for (service, frontend, client, probe) in &plan {
        rows.push(Row { service, frontend: frontend.clone(), client, result: run(probe)? });
    }

    println!("{:<13} {:<40} {:<11} answers (backend×requests)", "SERVICE", "FRONTEND", "CLIENT");
    for r in &rows {
        println!("{:<13} {:<40} {:<11} {}", r.service, r.frontend, r.client, r.result);
    }
    println!(
        "\n(eTP=Local via node-1 shows the client address the pod saw; node-2 has no local endpoint and drops.\n\
         Clients node-1 and node-2 are processes on the node itself, served by the socket hooks.)"
    );
    println!("\n$ lb-agent inspect services   # on node-1, from its pinned maps");
    let out =
        Command::new(agent_binary()).args(["inspect", "services", "--pin-dir"]).arg(c.pin_dir(0)).output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("\n$ lb-agent inspect stats      # on node-1");
    let out =
        Command::new(agent_binary()).args(["inspect", "stats", "--pin-dir"]).arg(c.pin_dir(0)).output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    drop(c);
    println!("\nDone in {:.1} s; namespaces, programs and pins removed.", started.elapsed().as_secs_f64());
    Ok(())
}
