//! The dataplane under pressure, frames through the real programs
//! (BPF_PROG_TEST_RUN): NAT ports that come back, nearly full port ranges,
//! reply tuples that would clash, and a conntrack table flooded at twice
//! its size. Needs root.

use lb_common::{CtKey, Drop, Event, FrontendKind, IPPROTO_UDP, L4};
use lb_tests::{
    bed::{Be, Bed, NODE_ADDR, Options, frontend},
    packet::{parse_checked, tcp, udp},
};
use lb_userspace::loader::Capacities;

const POD_CLIENT: [u8; 4] = [10, 244, 1, 5];
const CLUSTER_IP: [u8; 4] = [10, 96, 0, 10];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 7];
const LOCAL_POD: [u8; 4] = [10, 244, 1, 7];
const XDP_DROP: u32 = 1;

fn drops(bed: &Bed, reason: Drop) -> u64 {
    bed.maps.drops.get(&(reason as u32), 0).map(|v| v.iter().sum()).unwrap_or(0)
}

fn events(bed: &Bed, event: Event) -> u64 {
    bed.maps.events.get(&(event as u32), 0).map(|v| v.iter().sum()).unwrap_or(0)
}

/// A bed whose NAT range is `ports` wide, with a NodePort 30080 to one
/// remote backend.
fn remote_nodeport(ports: u16) -> Bed {
    let mut bed = Bed::with(Options { nat_ports: (61000, 61000 + ports - 1), ..Default::default() }).unwrap();
    bed.service(frontend([0; 4], 30080, L4::Tcp), FrontendKind::NodePort, &[Be::remote(REMOTE_POD, 8080)])
        .unwrap();
    bed.service(frontend([0; 4], 30053, L4::Udp), FrontendKind::NodePort, &[Be::remote(REMOTE_POD, 5353)])
        .unwrap();
    bed
}

/// The client port of flow `i`: many clients, many ports.
fn client(i: u32) -> ([u8; 4], u16) {
    ([192, 0, 2, 100 + (i / 50_000) as u8], 10_000 + (i % 50_000) as u16)
}

/// Opens flow `i` with a SYN; the NAT port it got, if translated.
fn syn(bed: &Bed, i: u32) -> Option<u16> {
    let out = bed.xdp(&tcp(client(i), (NODE_ADDR, 30080), "S", b"")).unwrap();
    let seen = parse_checked(&out.frame);
    (seen.dst == (REMOTE_POD, 8080)).then_some(seen.src.1)
}

/// Ten times the port range of short flows, one after the other, to one
/// remote backend: each ends (half with a RST, half with a FIN each way),
/// and its port comes back for the next ones.
#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn nat_ports_come_back_when_flows_end() {
    let mut bed = remote_nodeport(100);
    for i in 0..1000 {
        let port = syn(&bed, i).unwrap_or_else(|| panic!("flow {i} was not translated"));
        if i % 2 == 0 {
            bed.xdp(&tcp(client(i), (NODE_ADDR, 30080), "R", b"")).unwrap();
        } else {
            bed.xdp(&tcp(client(i), (NODE_ADDR, 30080), "AF", b"")).unwrap();
            bed.xdp(&tcp((REMOTE_POD, 8080), (NODE_ADDR, port), "AF", b"")).unwrap();
        }
    }
    assert_eq!(drops(&bed, Drop::NatExhausted), 0);
    assert!(events(&bed, Event::NatReclaimed) >= 900, "ports were taken back");

    // UDP flows end by going idle: fill the range, age the entries as a
    // minute would, and the next flows get ports again (half the range:
    // a claim may fail only when the range is nearly full of live flows).
    // Claims probe at random, so the last free ports take a few tries
    // (as netfilter's do): 200 clients fill the 100 ports for certain.
    let before = drops(&bed, Drop::NatExhausted);
    let translated = (0..200)
        .filter(|&i| bed.xdp(&udp(client(i), (NODE_ADDR, 30053), b"q")).unwrap().action != XDP_DROP)
        .count();
    assert_eq!(translated, 100, "every port of the range was handed out, once");
    assert_eq!(drops(&bed, Drop::NatExhausted) - before, 100, "the rest were dropped as nat_exhausted");
    let ct = &mut bed.maps.conntrack;
    let udp_keys: Vec<CtKey> = ct.keys().filter_map(Result::ok).filter(|k| k.proto == IPPROTO_UDP).collect();
    for k in udp_keys {
        let mut e = ct.get(&k, 0).unwrap();
        e.last_seen = 0;
        ct.insert(&k, &e, 0).unwrap();
    }
    for i in 200..250 {
        let out = bed.xdp(&udp(client(i), (NODE_ADDR, 30053), b"q")).unwrap();
        assert_eq!(
            parse_checked(&out.frame).dst,
            (REMOTE_POD, 5353),
            "UDP flow {i} after the old ones expired"
        );
    }
}

/// With 90% of a backend's port range held by live flows, 10,000 more
/// short flows all get a port: claims probe at random, so runs of taken
/// ports do not defeat them.
#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn a_nearly_full_port_range_still_hands_out_ports() {
    let bed = remote_nodeport(1000);
    for i in 0..900 {
        syn(&bed, i).unwrap_or_else(|| panic!("long-lived flow {i}"));
    }
    for i in 1000..11_000 {
        assert!(syn(&bed, i).is_some(), "flow {i} dropped with the range 90% full");
        bed.xdp(&tcp(client(i), (NODE_ADDR, 30080), "R", b"")).unwrap();
    }
    assert_eq!(drops(&bed, Drop::NatExhausted), 0);
}

/// One pod port to two frontends that share a backend (a Service's
/// ClusterIP and its NodePort): the second flow's reply tuple would be the
/// first's, so it gets another source port; each reply goes back as its own
/// frontend, and neither flow is lost.
#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn reply_tuples_never_clash() {
    let mut bed = Bed::new().unwrap();
    bed.service(frontend(CLUSTER_IP, 80, L4::Tcp), FrontendKind::ClusterIp, &[Be::local(LOCAL_POD, 8080)])
        .unwrap();
    bed.service(frontend([0; 4], 30080, L4::Tcp), FrontendKind::NodePort, &[Be::local(LOCAL_POD, 8080)])
        .unwrap();
    let first = parse_checked(&bed.tc(&tcp((POD_CLIENT, 40000), (CLUSTER_IP, 80), "S", b"")).unwrap().frame);
    let second =
        parse_checked(&bed.tc(&tcp((POD_CLIENT, 40000), (NODE_ADDR, 30080), "S", b"")).unwrap().frame);
    assert_eq!((first.src, first.dst), ((POD_CLIENT, 40000), (LOCAL_POD, 8080)));
    assert_eq!(second.dst, (LOCAL_POD, 8080));
    assert_eq!(second.src.0, POD_CLIENT, "the client's own address");
    assert_ne!(second.src.1, 40000, "another source port");
    assert_eq!(events(&bed, Event::NatRemapped), 1);
    for (seen, frontend) in [(&first, (CLUSTER_IP, 80)), (&second, (NODE_ADDR, 30080))] {
        let reply = bed.tc(&tcp(seen.dst, seen.src, "SA", b"")).unwrap();
        let back = parse_checked(&reply.frame);
        assert_eq!((back.src, back.dst), (frontend, (POD_CLIENT, 40000)), "reply to {:?}", seen.src);
    }
    // And the first flow's next packets still reach it.
    let data = bed.tc(&tcp((POD_CLIENT, 40000), (CLUSTER_IP, 80), "A", b"x")).unwrap();
    assert_eq!(parse_checked(&data.frame).src, (POD_CLIENT, 40000));
}

/// A flood of new flows at twice the conntrack table's size: established
/// flows that keep sending keep their entries (the LRU keeps what is
/// used), and the flood shows in the counters.
#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn established_flows_survive_a_flood_at_twice_the_table() {
    let size = 8192;
    let mut capacities = Capacities::default();
    capacities.set("conntrack-size", size);
    let mut bed = Bed::with(Options { capacities, ..Default::default() }).unwrap();
    let backends: Vec<Be> = (0..8).map(|i| Be::local([10, 244, 1, 20 + i], 8080)).collect();
    let id = bed.service(frontend(CLUSTER_IP, 80, L4::Tcp), FrontendKind::ClusterIp, &backends).unwrap();
    let established: Vec<_> = (0..10u16)
        .map(|i| {
            let src = ([10, 244, 1, 5], 30_000 + i);
            let out = parse_checked(&bed.tc(&tcp(src, (CLUSTER_IP, 80), "S", b"")).unwrap().frame);
            (src, out.dst)
        })
        .collect();
    let keep_sending = |bed: &Bed| {
        for (src, backend) in &established {
            let out = parse_checked(&bed.tc(&tcp(*src, (CLUSTER_IP, 80), "A", b"x")).unwrap().frame);
            assert_eq!(out.dst, *backend, "flow from {src:?} moved");
            let reply = parse_checked(&bed.tc(&tcp(*backend, *src, "A", b"y")).unwrap().frame);
            assert_eq!(reply.src, (CLUSTER_IP, 80), "reply to {src:?} untranslated");
        }
    };
    // Each new flow takes two entries: 2 × size entries' worth of flows.
    let flood = size;
    for i in 0..flood {
        let src = ([10, 245, (i / 250) as u8, (i % 250) as u8 + 1], 40_000);
        bed.tc(&tcp(src, (CLUSTER_IP, 80), "S", b"")).unwrap();
        if i % 256 == 0 {
            keep_sending(&bed);
        }
    }
    keep_sending(&bed);
    let stats = bed.maps.svc_stats.get(&id, 0).unwrap();
    let new_flows: u64 = stats.iter().map(|s| s.new_flows).sum();
    assert_eq!(new_flows, flood as u64 + 10, "the flood is counted");
    assert_eq!(events(&bed, Event::CtRecreated), 0, "no established flow had to start over");
    let ct = bed.maps.conntrack.keys().count();
    assert!(ct <= size as usize && ct > size as usize / 2, "the table ran full: {ct} of {size}");
}
