//! The benchmark in its short mode, so its code cannot rot: it must run to
//! the end and write every table with figures. Needs root. (The figures
//! themselves are no assertion: see BENCHMARKS.md and `cargo xtask bench`.)

use std::process::Command;

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn bench_quick_mode_writes_every_table() {
    lb_tests::require_root();
    let bench = lb_tests::netns::agent_binary().with_file_name("lb-bench");
    let out = std::env::temp_dir().join(format!("{}.md", lb_tests::netns::unique("bench")));
    let status =
        Command::new(&bench).args(["--quick", "--output"]).arg(&out).status().expect("lb-bench runs");
    assert!(status.success(), "lb-bench --quick failed");
    let md = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    for heading in [
        "## 1. Per-packet cost",
        "### First packet of a new flow",
        "## 2. Packets per second",
        "## 3. Short TCP connections",
        "## 3b. Short TCP connections from the node itself",
        "## 3c. Short TCP connections from a pod",
        "## 4. Control plane",
        "## Raw figures",
    ] {
        assert!(md.contains(heading), "missing {heading}:\n{md}");
    }
    // Data rows: service counts with figures.
    assert!(md.lines().any(|l| l.starts_with("| 1000 | ") && l.matches('|').count() >= 8), "{md}");
    // Every lane forwarded: a pps row and a connections row for each of the
    // four dataplanes (agent on TC and on XDP, iptables, nftables) at 100
    // services, and the rule loads beside the agent.
    assert!(md.lines().any(|l| l.starts_with("| 100 | new flow per frame | ")), "{md}");
    assert!(md.lines().any(|l| l.starts_with("| 100 | ") && l.matches('|').count() >= 12), "{md}");
    assert!(md.lines().any(|l| l.starts_with("| 100 | tcp | ") && l.ends_with(" s |")), "{md}");
    // From the node: socket hooks, iptables, nftables and the ceiling, all with figures.
    let host = md.split("## 3b.").nth(1).expect("part 3b");
    let row = host.lines().find(|l| l.starts_with("| 100 | ")).unwrap_or_else(|| panic!("{host}"));
    assert!(row.split('|').skip(2).take(4).all(|c| c.trim().parse::<f64>().is_ok_and(|v| v > 0.0)), "{row}");
    // From a pod: per packet, socket hooks, ceiling.
    let pod = md.split("## 3c.").nth(1).expect("part 3c");
    let row = pod.lines().find(|l| l.starts_with("| 100 | ")).unwrap_or_else(|| panic!("{pod}"));
    assert!(row.split('|').skip(2).take(3).all(|c| c.trim().parse::<f64>().is_ok_and(|v| v > 0.0)), "{row}");
}
