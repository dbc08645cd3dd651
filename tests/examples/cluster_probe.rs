//! Debugging aid: builds the scenario cluster, sends a burst to one NodePort
//! and prints what the nodes saw.
use std::path::Path;

use lb_tests::cluster::{Cluster, PodSpec, tally};

fn main() -> anyhow::Result<()> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let pods = vec![PodSpec::new("web-a", 0, "10.244.1.10"), PodSpec::new("web-c", 1, "10.244.2.10")];
    let c = Cluster::new(&examples, &pods)?;
    let answers = Cluster::http(&c.client, "http://192.0.2.11:30080/", 20)?;
    println!("{:?}", tally(&answers));
    let agent = lb_tests::netns::agent_binary();
    for (node, what) in [(0, "stats"), (0, "conntrack"), (1, "conntrack")] {
        let out = std::process::Command::new(&agent)
            .args(["inspect", what, "--pin-dir"])
            .arg(c.pin_dir(node))
            .output()?;
        println!(
            "{}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.contains("│ 0 "))
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    for ns in [&c.client, &c.nodes[0], &c.nodes[1]] {
        let out = ns.cmd("nstat").args(["-az"]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        println!(
            "{}: {}",
            ns.name,
            text.lines()
                .filter(|l| !l.split_whitespace().nth(1).is_some_and(|v| v == "0"))
                .filter(|l| l.contains("Tcp") || l.contains("Ip"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    Ok(())
}
