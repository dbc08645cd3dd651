//! The real `lb-agent` binary in a node namespace, from a manifests folder:
//! it programs the maps, `inspect` shows them, a manifest edit reaches the
//! maps within a second, a restart adopts without changes, and `reset`
//! removes everything. Needs root.

use std::{path::Path, process::Command, time::Duration};

use lb_tests::{
    netns::{Agent, Bpffs, Netns, agent_binary, run, veth, wait_for},
    require_root,
};
use serde_json::Value;

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
"#;

fn slice(addresses: &[&str]) -> String {
    let eps: Vec<String> =
        addresses.iter().map(|a| format!("  - addresses: [\"{a}\"]\n    nodeName: node-1\n")).collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
         endpoints:\n{}",
        eps.concat()
    )
}

/// A node namespace whose external interface ext0 (a veth) has 192.0.2.11.
fn node_namespace() -> Netns {
    let node = Netns::new("n").unwrap();
    veth(&node, "ext0", &node, "ext1").unwrap();
    node.ip(&["addr", "add", "192.0.2.11/24", "dev", "ext0"]).unwrap();
    node
}

/// `lb-agent run` from `manifests` as node-1 on ext0, pinning under `pin`,
/// then `extra`.
fn run_args(manifests: &Path, pin: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["run", "--manifests"].map(String::from).to_vec();
    args.push(manifests.to_string_lossy().into_owned());
    args.extend(["--node-name", "node-1", "--external-interface", "ext0", "--pin-dir"].map(String::from));
    args.push(pin.to_string_lossy().into_owned());
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn inspect(pin: &Path, what: &str) -> Option<Value> {
    let out = Command::new(agent_binary())
        .args(["inspect", what, "-o", "json", "--pin-dir"])
        .arg(pin)
        .output()
        .ok()?;
    out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
}

fn backends_of(pin: &Path, frontend: &str) -> Option<Vec<String>> {
    let services = inspect(pin, "services")?;
    let fe = services.as_array()?.iter().find(|s| s["frontend"] == frontend)?;
    Some(fe["backends"].as_array()?.iter().filter_map(|b| b.as_str().map(String::from)).collect())
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn agent_programs_updates_restarts_and_resets() {
    require_root();
    let node = node_namespace();
    let bpffs = Bpffs::new().unwrap();
    let pin = bpffs.dir.join("lb");
    let dir = tempdir();
    std::fs::write(dir.join("service.yaml"), SERVICE).unwrap();
    std::fs::write(dir.join("slice.yaml"), slice(&["10.244.1.5", "10.244.1.6"])).unwrap();

    let args = run_args(&dir, &pin, &["--pod-interfaces", "lbp*"]);
    let agent = Agent::start(&node, &args).unwrap();
    let got =
        wait_for(Duration::from_secs(10), || backends_of(&pin, "10.96.0.10:80/TCP").filter(|b| b.len() == 2));
    assert!(got.is_some(), "ClusterIP not programmed; agent log:\n{}", agent.log());
    let nodeport = backends_of(&pin, "*:30080/TCP").expect("NodePort frontend");
    assert_eq!(nodeport.len(), 2);
    // ext0 is a veth: the north-south program runs at TC there.
    let link = tc_link(&pin).expect("the TC link on ext0 is pinned");
    // BPF_LINK_TYPE_TCX, which bpftool 7.1 prints as its number (11).
    assert!(link.contains("\"tcx\"") || link.contains("\"type\":11"), "a TCX link: {link}");
    assert!(agent.log().contains("hook=tc"), "{}", agent.log());
    let link_id = serde_json::from_str::<Value>(&link).unwrap()["id"].as_u64().unwrap();

    // A manifest edit reaches the maps within a second.
    let written = std::time::Instant::now();
    std::fs::write(dir.join("slice.yaml"), slice(&["10.244.1.5", "10.244.1.6", "10.244.1.7"])).unwrap();
    let grown =
        wait_for(Duration::from_secs(1), || backends_of(&pin, "10.96.0.10:80/TCP").filter(|b| b.len() == 3));
    assert!(grown.is_some(), "edit not applied within 1 s; agent log:\n{}", agent.log());
    eprintln!("manifest edit applied in {:?}", written.elapsed());

    // A broken file is reported and changes nothing else.
    std::fs::write(dir.join("broken.yaml"), "kind: Service\nspec: [unclosed\n").unwrap();
    let reported = wait_for(Duration::from_secs(2), || agent.log().contains("broken.yaml").then_some(()));
    assert!(reported.is_some(), "broken manifest not reported:\n{}", agent.log());
    assert_eq!(backends_of(&pin, "10.96.0.10:80/TCP").map(|b| b.len()), Some(3));

    // Stop: programs stay attached, maps stay pinned.
    let ids_before = inspect(&pin, "services").unwrap();
    agent.stop().unwrap();
    assert!(tc_link(&pin).is_some(), "detached on stop");
    assert!(backends_of(&pin, "10.96.0.10:80/TCP").is_some(), "maps gone after stop");

    // Restart: adopts the maps; nothing is rewritten.
    let agent = Agent::start(&node, &args).unwrap();
    let synced = wait_for(Duration::from_secs(10), || agent.log().contains("synced").then_some(()));
    assert!(synced.is_some(), "no sync after restart:\n{}", agent.log());
    assert!(agent.log().contains("adopted the maps"), "{}", agent.log());
    assert_eq!(inspect(&pin, "services").unwrap(), ids_before, "restart changed the programmed state");
    agent.stop().unwrap();

    // Reset detaches and unpins.
    run(Command::new(agent_binary()).args(["reset", "--pin-dir"]).arg(&pin)).unwrap();
    let gone = Command::new("bpftool").args(["link", "show", "id", &link_id.to_string()]).output().unwrap();
    assert!(!gone.status.success(), "the TC link outlived the reset");
    assert!(inspect(&pin, "services").is_none(), "maps still pinned after reset");
}

/// The pinned TC link of ext0, as bpftool describes it.
fn tc_link(pin: &Path) -> Option<String> {
    let link = pin.join("links/lb_tc_ext@ext0");
    let out = Command::new("bpftool").args(["-j", "link", "show", "pinned"]).arg(&link).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tempdir() -> lb_tests::netns::TempDir {
    lb_tests::netns::TempDir::new("m").unwrap()
}

/// A long sync (thousands of Services in a debug build) holds one worker
/// thread; health and metrics keep answering on the other.
#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn health_answers_during_a_long_sync() {
    require_root();
    let node = node_namespace();
    let bpffs = Bpffs::new().unwrap();
    let pin = bpffs.dir.join("lb");
    let dir = tempdir();
    lb_tests::bench::write_manifests(&dir, 40_000, 1, lb_tests::bench::Proto::Tcp, None).unwrap();
    let args = run_args(&dir, &pin, &["--health-address", "127.0.0.1:9961"]);
    let agent = Agent::start(&node, &args).unwrap();
    let readyz = || {
        let out = node
            .cmd("curl")
            .args([
                "-s",
                "-m",
                "0.5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:9961/readyz",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listening = wait_for(Duration::from_secs(10), || {
        agent.log().contains("serving metrics and health").then_some(())
    });
    assert!(listening.is_some(), "{}", agent.log());
    let started = std::time::Instant::now();
    let mut answers = Vec::new();
    while !agent.log().contains("synced") && started.elapsed() < Duration::from_secs(60) {
        answers.push(readyz());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent.log().contains("synced frontends=40000"), "{}", agent.log());
    let waiting = answers.iter().filter(|a| *a == "503").count();
    assert!(waiting >= 3, "/readyz answered 503 only {waiting} times before the first sync: {answers:?}");
    assert!(
        answers.iter().all(|a| a == "503" || a == "200"),
        "/readyz did not answer within 0.5 s during the sync: {answers:?}"
    );
    assert_eq!(readyz(), "200");
}

/// With the default `--pin-dir` and nothing mounted on /sys/fs/bpf (the
/// node's fresh mount namespace of `ip netns exec`, with its own sysfs),
/// the agent mounts bpffs there and goes on. The machine's own /sys/fs/bpf
/// is not touched.
#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn the_default_pin_dir_gets_bpffs_mounted() {
    require_root();
    let mounts = || std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let before = mounts();
    let node = node_namespace();
    let dir = tempdir();
    std::fs::write(dir.join("service.yaml"), SERVICE).unwrap();
    std::fs::write(dir.join("slice.yaml"), slice(&["10.244.1.5"])).unwrap();
    let args = [
        "run",
        "--manifests",
        dir.to_str().unwrap(),
        "--node-name",
        "node-1",
        "--external-interface",
        "ext0",
    ];
    let agent = Agent::start(&node, &args).unwrap();
    let synced = wait_for(Duration::from_secs(10), || agent.log().contains("synced").then_some(()));
    assert!(synced.is_some(), "{}", agent.log());
    assert!(agent.log().contains("bpffs was not mounted: mounted it"), "{}", agent.log());
    // The agent's own mount namespace holds the mount, with its pins.
    let pid = agent.child.id();
    let theirs = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    let agent_mounts: Vec<&str> =
        theirs.lines().filter(|l| l.contains(" /sys/fs/bpf ") && l.contains(" bpf ")).collect();
    // `ip netns exec` runs the agent as its child: look there too.
    let in_ns = if agent_mounts.is_empty() {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        children.split_whitespace().any(|c| {
            std::fs::read_to_string(format!("/proc/{c}/mountinfo"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains(" /sys/fs/bpf ") && l.contains(" bpf "))
        })
    } else {
        true
    };
    assert!(in_ns, "no bpffs on /sys/fs/bpf in the agent's mount namespace");
    let metrics = node.cmd("curl").args(["-s", "-m", "2", "http://127.0.0.1:9960/metrics"]).output().unwrap();
    assert!(String::from_utf8_lossy(&metrics.stdout).contains("lb_frontends 2"), "metrics read the pins");
    drop(agent);
    assert_eq!(
        mounts().lines().filter(|l| l.contains(" /sys/fs/bpf ")).count(),
        before.lines().filter(|l| l.contains(" /sys/fs/bpf ")).count(),
        "the machine's mounts changed"
    );
}

/// More frontends than `lb_services` holds: the log names the map and the
/// flag, the frontends that fit (in key order) are programmed, the metric
/// counts the rest, and changes keep being applied: to what is programmed,
/// and to what waits once room is made.
#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn over_capacity_programs_what_fits_and_keeps_applying_changes() {
    require_root();
    let node = node_namespace();
    let bpffs = Bpffs::new().unwrap();
    let pin = bpffs.dir.join("lb");
    let dir = tempdir();
    let service = |i: u32, endpoints: &[&str]| {
        let eps: Vec<String> = endpoints.iter().map(|a| format!("{{addresses: [\"{a}\"]}}")).collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\n\
             spec: {{clusterIP: 10.96.1.{i}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: s{i}-1, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]\n",
            eps.join(", ")
        )
    };
    for i in 1..=6 {
        std::fs::write(dir.join(format!("s{i}.yaml")), service(i, &["10.244.1.5"])).unwrap();
    }
    let args = run_args(&dir, &pin, &["--max-frontends", "4"]);
    let agent = Agent::start(&node, &args).unwrap();
    let programmed = || -> Option<Vec<String>> {
        let services = inspect(&pin, "services")?;
        let mut v: Vec<String> =
            services.as_array()?.iter().filter_map(|s| s["frontend"].as_str().map(String::from)).collect();
        v.sort();
        Some(v)
    };
    let four = wait_for(Duration::from_secs(10), || programmed().filter(|v| v.len() == 4));
    assert_eq!(
        four,
        Some((1..=4).map(|i| format!("10.96.1.{i}:80/TCP")).collect()),
        "the first four by key; log:\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(log.contains("map lb_services is full (4 entries): raise --max-frontends"), "{log}");
    assert!(log.contains("default/s5: 10.96.1.5:80/TCP not programmed"), "{log}");
    let metrics = node.cmd("curl").args(["-s", "-m", "2", "http://127.0.0.1:9960/metrics"]).output().unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(metrics.contains("lb_unprogrammed_frontends 2"), "{metrics}");
    // Idle, it stays idle: reading the folder is no change to it.
    std::thread::sleep(Duration::from_millis(300));
    let syncs = agent.log().matches("synced frontends").count();
    assert!(syncs <= 3, "{syncs} syncs without a change:\n{}", agent.log());

    // A change to a programmed Service is applied.
    std::fs::write(dir.join("s2.yaml"), service(2, &["10.244.1.5", "10.244.1.6"])).unwrap();
    let grown =
        wait_for(Duration::from_secs(2), || backends_of(&pin, "10.96.1.2:80/TCP").filter(|b| b.len() == 2));
    assert!(grown.is_some(), "change not applied while over capacity; log:\n{}", agent.log());
    // Room made: a waiting frontend takes it.
    std::fs::remove_file(dir.join("s1.yaml")).unwrap();
    let moved = wait_for(Duration::from_secs(2), || {
        programmed().filter(|v| v.contains(&"10.96.1.5:80/TCP".to_string()) && v.len() == 4)
    });
    assert!(moved.is_some(), "the waiting frontend was not programmed; log:\n{}", agent.log());
    agent.stop().unwrap();
}
