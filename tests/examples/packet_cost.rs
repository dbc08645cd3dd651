//! Per-packet cost of `lb_xdp`, measured the ways shared/BENCHMARKING.md
//! says are valid here (run as root: `cargo run --release -p lb-tests --example packet_cost`).
//!
//! - Established flow and non-service traffic: live-frames mode
//!   (`BPF_F_TEST_XDP_LIVE_FRAMES`), each frame re-initialised from the input,
//!   on a veth inside a private network namespace; the action (XDP_PASS up the
//!   namespace's stack) is really carried out.
//! - New flow: the 5-tuple must change every packet, so many alternating
//!   single runs of a new-flow SYN and of a frame the program passes at once
//!   (ARP); the difference of medians is the cost of a new flow.

use std::{fs::File, os::fd::AsRawFd as _, process::Command};

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp};
use lb_common::{FrontendKey, FrontendKind, IPPROTO_TCP};
use lb_tests::{
    bed::{Be, Bed, NODE_ADDR},
    packet::tcp,
};

const CLIENT: [u8; 4] = [192, 0, 2, 100];

fn ip(args: &[&str]) -> Result<()> {
    let st = Command::new("ip").args(args).status()?;
    if !st.success() {
        bail!("ip {args:?} failed");
    }
    Ok(())
}

/// A namespace with one veth pair, both ends inside it; removed on drop.
struct Netns(String);

impl Netns {
    fn new() -> Result<Self> {
        let name = format!("lbcost-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Self(name);
        ip(&["-n", &ns.0, "link", "add", "name", "ext0", "type", "veth", "peer", "name", "ext1"])?;
        ip(&["-n", &ns.0, "link", "set", "ext0", "up"])?;
        ip(&["-n", &ns.0, "link", "set", "ext1", "up"])?;
        Ok(ns)
    }

    fn enter(&self) -> Result<()> {
        let f = File::open(format!("/run/netns/{}", self.0))?;
        // SAFETY: a valid netns fd; affects only the calling thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn xdp_md(ifindex: u32, len: u32) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&len.to_ne_bytes()); // data_end
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes()); // ingress_ifindex
    ctx
}

/// Mean ns per frame over `frames` live frames.
fn live(p: &Xdp, frame: &[u8], ifindex: u32, frames: u32) -> Result<f64> {
    let ctx = xdp_md(ifindex, frame.len() as u32);
    let r = p.test_run(TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        repeat: frames,
        attrs: TestRunAttrs::new().xdp_live_frames(64),
        ..Default::default()
    })?;
    Ok(r.duration.as_nanos() as f64)
}

fn single(p: &Xdp, frame: &[u8]) -> Result<f64> {
    let mut out = vec![0u8; frame.len() + 256];
    let r =
        p.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() })?;
    Ok(r.duration.as_nanos() as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let ns = Netns::new()?;
    let mut bed = Bed::new()?;
    let backends: Vec<Be> = (1..=10).map(|i| Be::local([10, 244, 1, i], 8080)).collect();
    bed.service(FrontendKey::new([0; 4], 30080, IPPROTO_TCP), FrontendKind::NodePort, 0, &backends)?;
    let p: &Xdp = bed.ebpf.program(lb_userspace::loader::XDP_PROGRAM).context("xdp")?.try_into()?;

    let established = tcp((CLIENT, 40000), (NODE_ADDR, 30080), "A", b"");
    // Open the flow once so every live frame hits its conntrack entry.
    single(p, &tcp((CLIENT, 40000), (NODE_ADDR, 30080), "S", b""))?;
    let not_service = tcp((CLIENT, 40000), ([192, 0, 2, 50], 80), "A", b"");
    let mut arp = established.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    // IPv4 but not TCP/UDP: passed right after parsing, then the same stack path.
    let mut icmp = Vec::new();
    etherparse::PacketBuilder::ethernet2(lb_tests::packet::CLIENT_MAC, lb_tests::packet::NODE_MAC)
        .ipv4(CLIENT, NODE_ADDR, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut icmp, &[0u8; 20])?;

    let rounds = 7;
    let frames = 200_000;
    let (mut est, mut other, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            ns.enter()?;
            let ifindex = nix_ifindex("ext0")?;
            for _ in 0..rounds {
                est.push(live(p, &established, ifindex, frames)?);
                other.push(live(p, &not_service, ifindex, frames)?);
                floor.push(live(p, &icmp, ifindex, frames)?);
            }
            Ok(())
        })
        .join()
        .expect("measuring thread")
    })?;

    let (mut new, mut base) = (Vec::new(), Vec::new());
    for i in 0..20_000u32 {
        let syn = tcp((CLIENT, 1024 + (i % 60000) as u16), (NODE_ADDR, 30080), "S", b"");
        new.push(single(p, &syn)?);
        base.push(single(p, &arp)?);
    }
    println!("lb_xdp per-packet cost (live frames: {rounds} rounds x {frames} frames, medians; ns/frame)");
    println!("  established flow, NodePort -> local backend, XDP_PASS : {:.0}", median(est));
    println!("  not for a service, XDP_PASS                           : {:.0}", median(other));
    println!("  floor: IPv4 ICMP passed after parsing, XDP_PASS       : {:.0}", median(floor));
    let (n, b) = (median(new), median(base));
    println!(
        "new flow (20000 alternating single runs, medians; ns): SYN {n:.0}, floor {b:.0}, difference {:.0}",
        n - b
    );
    Ok(())
}

fn nix_ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("no interface {name}");
    }
    Ok(idx)
}
