//! Debugging aid: one block of part 2's lanes, with the nodes' forwarding
//! counters (how many packets took the node's stack). Run as root:
//! `cargo run --release -p lb-tests --example lane_probe -- 1000`.
use std::time::Duration;

use lb_tests::{
    bench::Proto,
    lanes::{Dataplane, Lanes},
    netns::run,
};

fn forwarded(ns: &lb_tests::netns::Netns) -> u64 {
    let snmp = run(ns.cmd("cat").arg("/proc/net/snmp")).unwrap_or_default();
    let mut lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (head, vals) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    let i = head.split_whitespace().position(|f| f == "ForwDatagrams").unwrap_or(0);
    vals.split_whitespace().nth(i).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let n: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let mut lanes = Lanes::new(n, Proto::Udp)?;
    for (kind, flows) in [("new", 0), ("established", n)] {
        for (i, dp) in Dataplane::ALL.iter().enumerate() {
            let before = forwarded(&lanes.lanes[i].node);
            let r = lanes.pps(i, flows, Duration::from_secs(1), false)?;
            let fwd = forwarded(&lanes.lanes[i].node) - before;
            println!(
                "{kind:12} {:22} {:8.0} pps  offered {:8.0}  stack-forwarded {fwd}",
                dp.name(),
                r.pps(),
                r.offered()
            );
        }
        let r = lanes.pps(0, flows, Duration::from_secs(1), true)?;
        println!("{kind:12} {:22} {:8.0} pps  offered {:8.0}", "ceiling (direct)", r.pps(), r.offered());
    }
    Ok(())
}
