//! Packet fuzzing: random and mutated frames (truncations at every offset,
//! IP options, fragments, VLAN tags, every TCP flag combination, byte
//! flips, lengths that lie) to every frontend kind and to addresses that
//! are no service's, through the real programs (BPF_PROG_TEST_RUN). Each
//! result is checked with etherparse: a frame is dropped, passed
//! untouched, answered with a port unreachable when its frontend has no
//! endpoint, or rewritten to a backend of the frontend it was addressed to
//! with valid checksums and nothing else changed. Needs root.

use std::net::Ipv4Addr;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use lb_common::{FrontendKind, L4};
use lb_tests::{
    bed::{Be, Bed, NODE_ADDR, Run, desired, frontend},
    packet,
};
use lb_userspace::loader::{TC_EXT_PROGRAM, TC_POD_PROGRAM, XDP_PROGRAM};

const XDP_DROP: u32 = 1;
const TC_ACT_SHOT: u32 = 2;

/// A frontend of the test set: where clients send, and what answers.
struct Target {
    dst: ([u8; 4], u16),
    l4: L4,
    backends: Vec<([u8; 4], u16)>,
    /// The node's address on a NodePort.
    node_port: bool,
}

fn targets() -> Vec<(Target, FrontendKind, Vec<Be>, bool)> {
    let local_web = Be::local([10, 244, 1, 7], 8080);
    let remote_web = Be::remote([10, 244, 2, 7], 8080);
    let dns = Be::local([10, 244, 1, 8], 5353);
    let t = |dst: ([u8; 4], u16), l4, kind, bes: Vec<Be>, local_only| {
        let target = Target {
            dst: if kind == FrontendKind::NodePort { (NODE_ADDR, dst.1) } else { dst },
            l4,
            backends: bes.iter().map(|b| (b.addr, b.port)).collect(),
            node_port: kind == FrontendKind::NodePort,
        };
        (target, kind, bes, local_only)
    };
    vec![
        t(([10, 96, 0, 10], 80), L4::Tcp, FrontendKind::ClusterIp, vec![local_web, remote_web], false),
        t(([10, 96, 0, 11], 53), L4::Udp, FrontendKind::ClusterIp, vec![dns], false),
        t(([0; 4], 30080), L4::Tcp, FrontendKind::NodePort, vec![remote_web], false),
        t(([0; 4], 30053), L4::Udp, FrontendKind::NodePort, vec![dns], false),
        t(([198, 51, 100, 10], 80), L4::Tcp, FrontendKind::LoadBalancer, vec![local_web], false),
        t(([203, 0, 113, 10], 443), L4::Tcp, FrontendKind::ExternalIp, vec![remote_web], false),
        t(([10, 96, 0, 12], 80), L4::Tcp, FrontendKind::ClusterIp, vec![], false),
        t(([0; 4], 30081), L4::Tcp, FrontendKind::NodePort, vec![], true),
    ]
}

/// xorshift64*: reproducible without a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const FLAGS: [(u8, char); 6] = [(0x01, 'F'), (0x02, 'S'), (0x04, 'R'), (0x08, 'P'), (0x10, 'A'), (0x20, 'U')];

/// A well-formed frame from a random client to `dst`, with the TCP flag
/// bits of `flags` (all eight, ECE and CWR included).
fn frame(rng: &mut Rng, dst: ([u8; 4], u16), l4: L4, flags: u8) -> Vec<u8> {
    let src = ([192, 0, 2, 100 + rng.below(50) as u8], 1024 + rng.below(60_000) as u16);
    let payload: Vec<u8> = (0..rng.below(48)).map(|_| rng.next() as u8).collect();
    match l4 {
        L4::Udp => packet::udp(src, dst, &payload),
        _ => {
            let names: String = FLAGS.iter().filter(|(bit, _)| flags & bit != 0).map(|(_, c)| *c).collect();
            let mut f = packet::tcp(src, dst, &names, &payload);
            // ECE/CWR through the raw byte, checksum fixed as a sender would.
            if flags & 0xc0 != 0 {
                f[14 + 20 + 13] |= flags & 0xc0;
                fix_l4_checksum(&mut f);
            }
            f
        }
    }
}

fn fix_l4_checksum(f: &mut [u8]) {
    let fixed = {
        let p = SlicedPacket::from_ethernet(f).unwrap();
        let Some(NetSlice::Ipv4(ip)) = &p.net else { return };
        let iph = ip.header().to_header();
        let Some(TransportSlice::Tcp(t)) = &p.transport else { return };
        let c = t.to_header().calc_checksum_ipv4(&iph, t.payload()).unwrap();
        (14 + iph.header_len() + 16, c)
    };
    f[fixed.0..fixed.0 + 2].copy_from_slice(&fixed.1.to_be_bytes());
}

/// `f` with `n` words of IP options (NOPs and an end marker), lengths and
/// the header checksum made right: still a valid packet.
fn with_options(f: &[u8], n: usize) -> Vec<u8> {
    let mut out = f[..34].to_vec();
    out.extend(std::iter::repeat_n(1u8, n * 4 - 1));
    out.push(0);
    out.extend_from_slice(&f[34..]);
    out[14] = 0x40 | (5 + n as u8);
    let tot = (out.len() - 14) as u16;
    out[16..18].copy_from_slice(&tot.to_be_bytes());
    out[24..26].copy_from_slice(&[0, 0]);
    let c = lb_common::csum::checksum(&out[14..14 + 20 + n * 4]);
    out[24..26].copy_from_slice(&c.to_be_bytes());
    out
}

/// What a mutation did, for the failure message.
fn mutate(rng: &mut Rng, f: Vec<u8>) -> (Vec<u8>, &'static str) {
    match rng.below(10) {
        0..=3 => (f, "none"),
        4 => {
            let at = rng.below(f.len() as u64) as usize;
            (f[..at.max(14)].to_vec(), "truncated")
        }
        5 => {
            let n = 1 + rng.below(10) as usize;
            (with_options(&f, n), "IP options")
        }
        6 => {
            let mut f = f;
            if rng.chance(50) {
                f[14 + 6] |= 0x20;
            } else {
                f[14 + 7] = 1 + rng.below(255) as u8;
            }
            (f, "fragment")
        }
        7 => (packet::with_vlan(&f), "VLAN tag"),
        8 => {
            let mut f = f;
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(f.len() as u64) as usize;
                f[at] ^= 1 << rng.below(8);
            }
            (f, "bit flips")
        }
        _ => {
            let mut f = f;
            let lie = rng.below(2000) as u16;
            f[16..18].copy_from_slice(&lie.to_be_bytes());
            (f, "IP total length")
        }
    }
}

/// The IPv4 header's offset and length, the L4 header's offset, if the
/// frame is one our checks can read.
fn layout(f: &[u8]) -> Option<(usize, usize)> {
    let l3 = if f.get(12..14)? == [0x81, 0x00] { 18 } else { 14 };
    let ihl = (*f.get(l3)? as usize & 0x0f) * 4;
    Some((l3, ihl))
}

/// Checksums as etherparse computes them: (IP valid, L4 valid).
fn checksums_ok(f: &[u8]) -> Option<(bool, bool)> {
    let p = SlicedPacket::from_ethernet(f).ok()?;
    let Some(NetSlice::Ipv4(ip)) = &p.net else { return None };
    let iph = ip.header().to_header();
    let ip_ok = iph.header_checksum == iph.calc_header_checksum();
    let l4_ok = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            t.checksum() == t.to_header().calc_checksum_ipv4(&iph, t.payload()).ok()?
        }
        Some(TransportSlice::Udp(u)) => {
            u.checksum() == 0 || u.checksum() == u.to_header().calc_checksum_ipv4(&iph, u.payload()).ok()?
        }
        _ => return None,
    };
    Some((ip_ok, l4_ok))
}

/// Checks one result; `Err` says what is wrong.
fn check(input: &[u8], out: &Run, targets: &[Target], tc: bool) -> Result<(), String> {
    if out.action == XDP_DROP && !tc || out.action == TC_ACT_SHOT && tc || out.frame == input {
        return Ok(());
    }
    // Rewritten: a port unreachable...
    let p = SlicedPacket::from_ethernet(&out.frame)
        .map_err(|e| format!("rewritten frame does not parse: {e}"))?;
    if let Some(TransportSlice::Icmpv4(_)) = &p.transport {
        let icmp = packet::parse_port_unreachable(&out.frame);
        let reject =
            targets.iter().find(|t| t.backends.is_empty() && !t.node_port).expect("a reject frontend");
        return if icmp.quoted_dst == reject.dst {
            Ok(())
        } else {
            Err(format!("ICMP for {:?}", icmp.quoted_dst))
        };
    }
    // ...or a translation to a backend of the frontend it was sent to.
    let Some(NetSlice::Ipv4(ip_in)) = SlicedPacket::from_ethernet(input).ok().and_then(|p| p.net) else {
        return Err("a frame that is not IPv4 was rewritten".into());
    };
    let hin = ip_in.header().to_header();
    let Some(NetSlice::Ipv4(ip_out)) = &p.net else { return Err("rewritten into something not IPv4".into()) };
    let hout = ip_out.header().to_header();
    let ports = |f: &[u8], l4: usize| {
        (u16::from_be_bytes([f[l4], f[l4 + 1]]), u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]))
    };
    let (l3, ihl) = layout(input).ok_or("no layout")?;
    if hin.fragment_offset.value() != 0 {
        return later_fragment(input, out, targets, (&hin, &hout), l3 + ihl);
    }
    let (_, dport_in) = ports(input, l3 + ihl);
    let (sport_out, dport_out) = ports(&out.frame, l3 + ihl);
    let target = targets
        .iter()
        .find(|t| t.dst == (hin.destination, dport_in) && t.l4.proto() == hin.protocol.0)
        .ok_or_else(|| {
            format!("rewrote a frame to {:?}:{dport_in}, no frontend", Ipv4Addr::from(hin.destination))
        })?;
    if !target.backends.contains(&(hout.destination, dport_out)) {
        return Err(format!("sent to {:?}:{dport_out}, not a backend of {:?}", hout.destination, target.dst));
    }
    // The client's own source (its port may move, on a reply-tuple clash),
    // or the node's (SNAT).
    if hout.source != hin.source && hout.source != NODE_ADDR {
        return Err(format!("source {:?}:{sport_out} from {:?}", hout.source, hin.source));
    }
    // Nothing else changed: IP fields but addresses, TTL and checksum; the
    // options; the L4 bytes but ports and checksum; the payload.
    let ttl_drop = hin.time_to_live - hout.time_to_live;
    if ttl_drop > 1 || (ttl_drop == 1 && !forwards_frame(out, tc)) {
        return Err(format!("TTL {} → {}", hin.time_to_live, hout.time_to_live));
    }
    let same_ip = hin.dscp == hout.dscp
        && hin.identification == hout.identification
        && hin.total_len == hout.total_len
        && hin.protocol == hout.protocol
        && hin.options == hout.options
        && hin.dont_fragment == hout.dont_fragment;
    if !same_ip {
        return Err(format!("IP header changed: {hin:?} → {hout:?}"));
    }
    if input.len() != out.frame.len() || input[12..l3 + 2] != out.frame[12..l3 + 2] {
        return Err("L2 type, tag or length changed".into());
    }
    let l4 = l3 + ihl;
    let check_off = if hin.protocol.0 == 6 { 16 } else { 6 };
    let checksum = l4 + check_off..l4 + check_off + 2;
    let changed = (l4 + 4..input.len()).find(|i| !checksum.contains(i) && input[*i] != out.frame[*i]);
    if let Some(i) = changed {
        return Err(format!("byte {i} changed"));
    }
    match (checksums_ok(input), checksums_ok(&out.frame)) {
        (Some((true, true)), Some((true, true))) => Ok(()),
        (Some((true, true)), got) => Err(format!("checksums broken by the rewrite: {got:?}")),
        _ => Ok(()),
    }
}

/// A later fragment has no ports: only its addresses may change, to what
/// a first fragment of its datagram got (a backend of a frontend at its
/// destination; the node's address as source), and its bytes past the IP
/// header stay as they were.
fn later_fragment(
    input: &[u8],
    out: &Run,
    targets: &[Target],
    (hin, hout): (&etherparse::Ipv4Header, &etherparse::Ipv4Header),
    l4: usize,
) -> Result<(), String> {
    if input.len() != out.frame.len() || input[l4..] != out.frame[l4..] {
        return Err("a later fragment's payload changed".into());
    }
    let to_backend = targets.iter().any(|t| {
        t.dst.0 == hin.destination
            && t.l4.proto() == hin.protocol.0
            && t.backends.iter().any(|b| b.0 == hout.destination)
    });
    if !to_backend {
        return Err(format!("a later fragment sent to {:?}", Ipv4Addr::from(hout.destination)));
    }
    if hout.source != hin.source && hout.source != NODE_ADDR {
        return Err(format!("a later fragment from {:?}", Ipv4Addr::from(hout.source)));
    }
    let valid = |h: &etherparse::Ipv4Header| h.header_checksum == h.calc_header_checksum();
    if valid(hin) && !valid(hout) {
        return Err("a later fragment's IP checksum broken".into());
    }
    Ok(())
}

/// Whether the program sent the frame on itself (XDP_TX, a redirect),
/// which takes one hop off the TTL.
fn forwards_frame(out: &Run, tc: bool) -> bool {
    if tc { out.action == 7 } else { out.action == 3 }
}

/// Runs `frame` through every program; how many runs there were (the
/// kernel builds no socket buffer from a frame without a whole IPv4
/// header, so TC runs of those do not count).
fn run_all(bed: &Bed, frame: &[u8], what: &str, targets: &[Target], failures: &mut Vec<String>) -> u64 {
    if frame.is_empty() {
        return 0;
    }
    let mut runs = 0;
    for (program, tc) in [(XDP_PROGRAM, false), (TC_EXT_PROGRAM, true), (TC_POD_PROGRAM, true)] {
        let out = match program {
            XDP_PROGRAM => bed.xdp(frame),
            TC_EXT_PROGRAM => bed.tc_ext(frame),
            _ => bed.tc(frame),
        };
        let Ok(out) = out else { continue };
        runs += 1;
        // tc_ext runs the frame addressed to the test device.
        let mut input = frame.to_vec();
        if program == TC_EXT_PROGRAM {
            input[..6].copy_from_slice(&[0; 6]);
        }
        let mut cmp = out.frame.clone();
        if out.frame.len() >= 12 && forwards_frame(&out, tc) {
            // Sent on: the MACs are the next hop's.
            cmp[..12].copy_from_slice(&input[..12]);
        }
        let seen = Run { action: out.action, frame: cmp };
        if let Err(e) = check(&input, &seen, targets, tc) {
            failures.push(format!("{program}, {what}: {e}\n  in:  {input:02x?}\n  out: {:02x?}", out.frame));
        }
    }
    runs
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn random_and_mutated_frames_are_passed_dropped_or_translated_right() {
    let mut bed = Bed::new().unwrap();
    let set = targets();
    for (target, kind, bes, local_only) in &set {
        let addr = if target.node_port { [0; 4] } else { target.dst.0 };
        let mut fe = desired(*kind, bes);
        fe.local_only = *local_only;
        bed.program(frontend(addr, target.dst.1, target.l4), fe).unwrap();
    }
    let targets: Vec<Target> = set.into_iter().map(|(t, ..)| t).collect();
    let seed = std::env::var("LB_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_1bf0);
    let mut rng = Rng(seed);
    let mut runs = 0u64;
    let mut failures = Vec::new();
    let mut run_one = |bed: &Bed, frame: &[u8], what: &str| {
        runs += run_all(bed, frame, what, &targets, &mut failures);
        runs
    };
    // Truncations at every offset of a frame to each frontend.
    for t in &targets {
        let f = frame(&mut rng, t.dst, t.l4, 0x02);
        for at in 14..f.len() {
            run_one(&bed, &f[..at], "truncated");
        }
    }
    // Every TCP flag combination to each TCP frontend.
    for t in targets.iter().filter(|t| t.l4 == L4::Tcp) {
        for flags in 0..=255u8 {
            let f = frame(&mut rng, t.dst, t.l4, flags);
            run_one(&bed, &f, "flags");
        }
    }
    // Random frames, mutated, to frontends and to what is no service.
    while run_one(&bed, &[], "") < 100_000 {
        let dst = match rng.below(6) {
            0 => {
                ([rng.next() as u8, rng.next() as u8, rng.next() as u8, rng.next() as u8], rng.next() as u16)
            }
            1 => (NODE_ADDR, rng.next() as u16),
            2 => ([0, 0, 0, 0], [30080, 30053][rng.below(2) as usize]),
            _ => (targets[rng.below(targets.len() as u64) as usize].dst.0, 0),
        };
        let (dst, l4) = match targets.iter().find(|t| t.dst.0 == dst.0 && dst.1 == 0) {
            Some(t) => (t.dst, t.l4),
            None => (dst, if rng.chance(50) { L4::Tcp } else { L4::Udp }),
        };
        let flags = rng.next() as u8;
        let f = frame(&mut rng, dst, l4, flags);
        let (f, what) = mutate(&mut rng, f);
        run_one(&bed, &f, what);
    }
    let runs = run_one(&bed, &[], "");
    drop(run_one);
    assert!(
        failures.is_empty(),
        "{} of {runs} runs wrong (seed {seed}):\n{}",
        failures.len(),
        failures[..failures.len().min(10)].join("\n")
    );
    eprintln!("{runs} frames through the programs, all passed, dropped or translated right");
}
