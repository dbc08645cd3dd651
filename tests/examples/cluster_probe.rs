//! Debugging aid: builds the demo cluster, sends a few requests (one to a
//! service without endpoints) and prints node-1's agent log. Run as root,
//! e.g. `LB_TEST_AGENT_LOG=lb_userspace=debug,aya_log=debug cargo run -p lb-tests --example cluster_probe`.
use std::path::Path;

use lb_tests::cluster::{Cluster, standard_pods};

fn main() -> anyhow::Result<()> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let c = Cluster::new(&examples, &standard_pods())?;
    let pod = &c.pod("client-pod").ns;
    println!("ClusterIP: {:?}", Cluster::http(pod, "http://10.96.0.10/", 3)?);
    println!("no endpoints: {:?}", Cluster::http_once(pod, "http://10.96.0.16/", 2));
    std::thread::sleep(std::time::Duration::from_millis(300));
    println!("{}", c.agent_log(0));
    Ok(())
}
