//! Packet-in / packet-out tests of the real XDP and TC programs through
//! BPF_PROG_TEST_RUN, with the maps programmed as the agent would. Needs root.

use std::net::Ipv4Addr;

use aya::maps::PerCpuArray;
use lb_common::{CtKey, Drop, FrontendKind, IPPROTO_TCP, L4, NextHop, ct_flags, registry};
use lb_tests::{
    bed::{Be, Bed, NODE_ADDR, desired, frontend, internal},
    bench::{self, NEXT_HOP, NEXT_HOP_MAC, Wire},
    packet::{self, parse_checked, parse_port_unreachable, tcp, udp},
};
use lb_userspace::model::DesiredBackend;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;
const TC_ACT_SHOT: u32 = 2;

const POD_CLIENT: [u8; 4] = [10, 244, 1, 5];
const EXT_CLIENT: [u8; 4] = [192, 0, 2, 100];
const CLUSTER_IP: [u8; 4] = [10, 96, 0, 10];
const LB_IP: [u8; 4] = [198, 51, 100, 10];
const EXTERNAL_IP: [u8; 4] = [203, 0, 113, 10];
const LOCAL_POD: [u8; 4] = [10, 244, 1, 7];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 7];

fn bed() -> Bed {
    Bed::new().expect("load the dataplane")
}

fn ct(bed: &Bed, key: CtKey) -> Option<lb_common::CtEntry> {
    bed.maps.conntrack.get(&key, 0).ok()
}

fn drops(bed: &Bed, reason: Drop) -> u64 {
    bed.maps.drops.get(&(reason as u32), 0).map(|v| v.iter().sum()).unwrap_or(0)
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn clusterip_from_pod_is_dnated_and_tracked() {
    let mut bed = bed();
    let id = bed
        .service(frontend(CLUSTER_IP, 80, L4::Tcp), FrontendKind::ClusterIp, &[Be::remote(REMOTE_POD, 8080)])
        .unwrap();
    let out = bed.tc(&tcp((POD_CLIENT, 40000), (CLUSTER_IP, 80), "S", b"")).unwrap();
    assert_eq!(out.action, TC_ACT_OK);
    let seen = parse_checked(&out.frame);
    assert_eq!(seen.src, (POD_CLIENT, 40000), "the pod's address is kept");
    assert_eq!(seen.dst, (REMOTE_POD, 8080));

    let fwd = ct(&bed, CtKey::new(POD_CLIENT, CLUSTER_IP, 40000, 80, IPPROTO_TCP)).expect("request entry");
    assert_eq!(fwd.frontend_id, id);
    assert_eq!((fwd.nat_daddr, fwd.nat_dport), (REMOTE_POD, 8080));
    assert_eq!(fwd.flags & ct_flags::SNAT, 0, "pods are never source-NATed");
    let rev = ct(&bed, CtKey::new(REMOTE_POD, POD_CLIENT, 8080, 40000, IPPROTO_TCP)).expect("reply entry");
    assert!(rev.is_reply());
    assert_eq!((rev.nat_saddr, rev.nat_sport), (CLUSTER_IP, 80));

    // Data on the established flow goes to the same backend.
    let out = bed.tc(&tcp((POD_CLIENT, 40000), (CLUSTER_IP, 80), "AP", b"GET / HTTP/1.1\r\n\r\n")).unwrap();
    assert_eq!(parse_checked(&out.frame).dst, (REMOTE_POD, 8080));

    // The reply from the other node arrives on the external interface.
    let out = bed.xdp(&tcp((REMOTE_POD, 8080), (POD_CLIENT, 40000), "SA", b"")).unwrap();
    assert_eq!(out.action, XDP_PASS);
    let seen = parse_checked(&out.frame);
    assert_eq!(seen.src, (CLUSTER_IP, 80), "reply comes from the service address");
    assert_eq!(seen.dst, (POD_CLIENT, 40000));

    let stats = bed.maps.svc_stats.get(&id, 0).unwrap();
    let total: u64 = stats.iter().map(|s| s.packets).sum();
    let new: u64 = stats.iter().map(|s| s.new_flows).sum();
    assert_eq!((total, new), (3, 1));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn a_pod_reaching_itself_through_its_service_is_source_natted_to_the_node() {
    let mut bed = bed();
    for l4 in [L4::Tcp, L4::Udp] {
        bed.service(frontend(CLUSTER_IP, 80, l4), FrontendKind::ClusterIp, &[Be::local(LOCAL_POD, 8080)])
            .unwrap();
        let (request, answer) = match l4 {
            L4::Tcp => (tcp((LOCAL_POD, 40000), (CLUSTER_IP, 80), "S", b""), None),
            _ => (udp((LOCAL_POD, 40000), (CLUSTER_IP, 80), b"q"), Some(())),
        };
        let out = bed.tc(&request).unwrap();
        let seen = parse_checked(&out.frame);
        assert_eq!(seen.dst, (LOCAL_POD, 8080), "{l4:?}: to the pod itself");
        assert_eq!(
            seen.src.0, NODE_ADDR,
            "{l4:?}: from the node's address, so that the reply leaves the pod"
        );
        let nat_port = seen.src.1;
        assert!(nat_port >= 61000, "{l4:?}: a claimed NAT port, {nat_port}");
        let reply = match answer {
            None => tcp((LOCAL_POD, 8080), (NODE_ADDR, nat_port), "SA", b""),
            Some(()) => udp((LOCAL_POD, 8080), (NODE_ADDR, nat_port), b"a"),
        };
        let back = parse_checked(&bed.tc(&reply).unwrap().frame);
        assert_eq!(
            (back.src, back.dst),
            ((CLUSTER_IP, 80), (LOCAL_POD, 40000)),
            "{l4:?}: the service answers"
        );
    }
    // Another pod of the same backend is not source-NATed.
    let out = bed.tc(&tcp((POD_CLIENT, 40001), (CLUSTER_IP, 80), "S", b"")).unwrap();
    assert_eq!(parse_checked(&out.frame).src, (POD_CLIENT, 40001));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn reply_of_local_backend_is_translated_at_tc() {
    let mut bed = bed();
    bed.service(frontend(CLUSTER_IP, 53, L4::Udp), FrontendKind::ClusterIp, &[Be::local(LOCAL_POD, 5353)])
        .unwrap();
    let out = bed.tc(&udp((POD_CLIENT, 33333), (CLUSTER_IP, 53), b"query")).unwrap();
    assert_eq!(parse_checked(&out.frame).dst, (LOCAL_POD, 5353));
    let out = bed.tc(&udp((LOCAL_POD, 5353), (POD_CLIENT, 33333), b"answer")).unwrap();
    assert_eq!(out.action, TC_ACT_OK);
    let seen = parse_checked(&out.frame);
    assert_eq!((seen.src, seen.dst), ((CLUSTER_IP, 53), (POD_CLIENT, 33333)));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn nodeport_to_local_backend_keeps_client_address() {
    let mut bed = bed();
    bed.service(frontend([0; 4], 30080, L4::Tcp), FrontendKind::NodePort, &[Be::local(LOCAL_POD, 8080)])
        .unwrap();
    let out = bed.xdp(&tcp((EXT_CLIENT, 50000), (NODE_ADDR, 30080), "S", b"")).unwrap();
    assert_eq!(out.action, XDP_PASS, "local backends are delivered by the stack");
    let seen = parse_checked(&out.frame);
    assert_eq!((seen.src, seen.dst), ((EXT_CLIENT, 50000), (LOCAL_POD, 8080)));

    // The pod's reply leaves through its interface (TC) as the node port.
    let out = bed.tc(&tcp((LOCAL_POD, 8080), (EXT_CLIENT, 50000), "SA", b"")).unwrap();
    let seen = parse_checked(&out.frame);
    assert_eq!((seen.src, seen.dst), ((NODE_ADDR, 30080), (EXT_CLIENT, 50000)));

    // A node port on an address that is not this node's is not ours.
    let other = tcp((EXT_CLIENT, 50001), ([192, 0, 2, 99], 30080), "S", b"");
    let out = bed.xdp(&other).unwrap();
    assert_eq!((out.action, out.frame), (XDP_PASS, other));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn nodeport_to_remote_backend_is_source_natted_and_reply_restored() {
    let mut bed = bed();
    bed.service(frontend([0; 4], 30080, L4::Tcp), FrontendKind::NodePort, &[Be::remote(REMOTE_POD, 8080)])
        .unwrap();
    let out = bed.xdp(&tcp((EXT_CLIENT, 50000), (NODE_ADDR, 30080), "S", b"")).unwrap();
    // Without a route in the test run the FIB lookup fails and the stack forwards.
    assert!(out.action == XDP_PASS || out.action == XDP_TX, "action {}", out.action);
    let seen = parse_checked(&out.frame);
    assert_eq!(seen.dst, (REMOTE_POD, 8080));
    assert_eq!(seen.src.0, NODE_ADDR, "source-NATed to the node");
    let nat_port = seen.src.1;
    assert!((lb_common::DEFAULT_NAT_PORT_MIN..=lb_common::DEFAULT_NAT_PORT_MAX).contains(&nat_port));

    let rev = ct(&bed, CtKey::new(REMOTE_POD, NODE_ADDR, 8080, nat_port, IPPROTO_TCP))
        .expect("reply entry on the NAT port");
    assert_ne!(rev.flags & ct_flags::SNAT, 0);

    let out = bed.xdp(&tcp((REMOTE_POD, 8080), (NODE_ADDR, nat_port), "SA", b"")).unwrap();
    assert!(out.action == XDP_PASS || out.action == XDP_TX);
    let seen = parse_checked(&out.frame);
    assert_eq!((seen.src, seen.dst), ((NODE_ADDR, 30080), (EXT_CLIENT, 50000)));

    // A second client gets its own NAT port.
    let out = bed.xdp(&tcp(([192, 0, 2, 101], 50000), (NODE_ADDR, 30080), "S", b"")).unwrap();
    assert_ne!(parse_checked(&out.frame).src.1, nat_port);
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn loadbalancer_and_external_ips_are_translated_both_ways() {
    let mut bed = bed();
    // (Each from its own client port: one port to both, sharing the
    // backend, would be a reply-tuple clash, see `pressure.rs`.)
    for (vip, kind, port) in
        [(LB_IP, FrontendKind::LoadBalancer, 50100), (EXTERNAL_IP, FrontendKind::ExternalIp, 50101)]
    {
        bed.service(frontend(vip, 80, L4::Tcp), kind, &[Be::local(LOCAL_POD, 8080)]).unwrap();
        let out = bed.xdp(&tcp((EXT_CLIENT, port), (vip, 80), "S", b"")).unwrap();
        assert_eq!(out.action, XDP_PASS);
        let seen = parse_checked(&out.frame);
        assert_eq!((seen.src, seen.dst), ((EXT_CLIENT, port), (LOCAL_POD, 8080)), "{kind:?}");
        let out = bed.tc(&tcp((LOCAL_POD, 8080), (EXT_CLIENT, port), "SA", b"")).unwrap();
        let seen = parse_checked(&out.frame);
        assert_eq!((seen.src, seen.dst), ((vip, 80), (EXT_CLIENT, port)), "{kind:?} reply");
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn no_endpoints_answers_icmp_port_unreachable() {
    let mut bed = bed();
    bed.service(frontend(CLUSTER_IP, 80, L4::Tcp), FrontendKind::ClusterIp, &[]).unwrap();
    bed.service(frontend(CLUSTER_IP, 53, L4::Udp), FrontendKind::ClusterIp, &[]).unwrap();

    let out = bed.xdp(&tcp((EXT_CLIENT, 50000), (CLUSTER_IP, 80), "S", b"")).unwrap();
    assert_eq!(out.action, XDP_TX, "sent back out of the ingress interface");
    let icmp = parse_port_unreachable(&out.frame);
    assert_eq!(icmp.from, std::net::Ipv4Addr::from(CLUSTER_IP));
    assert_eq!(icmp.to, std::net::Ipv4Addr::from(EXT_CLIENT));
    assert_eq!((icmp.quoted_src, icmp.quoted_dst), ((EXT_CLIENT, 50000), (CLUSTER_IP, 80)));
    assert_eq!(icmp.eth_dst, packet::CLIENT_MAC, "addressed back to the sender");

    // Short UDP datagram: the frame has to grow to hold the reply.
    let out = bed.tc(&udp((POD_CLIENT, 40000), (CLUSTER_IP, 53), b"q")).unwrap();
    assert_eq!(out.action, TC_ACT_REDIRECT);
    let icmp = parse_port_unreachable(&out.frame);
    assert_eq!((icmp.quoted_src, icmp.quoted_dst), ((POD_CLIENT, 40000), (CLUSTER_IP, 53)));
    assert_eq!(icmp.to, std::net::Ipv4Addr::from(POD_CLIENT));
    assert_eq!(drops(&bed, Drop::Rejected), 2);
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn the_cluster_ip_catch_all_rejects_unused_ports_and_drops_unallocated_addresses() {
    let mut bed = bed();
    bed.service(frontend(CLUSTER_IP, 80, L4::Tcp), FrontendKind::ClusterIp, &[Be::local(LOCAL_POD, 8080)])
        .unwrap();
    // Without service CIDRs, nothing is caught.
    let unused_port = tcp((POD_CLIENT, 40000), (CLUSTER_IP, 81), "S", b"");
    assert_eq!(bed.tc(&unused_port).unwrap().action, TC_ACT_OK);
    bed.set_service_cidrs(&["10.96.0.0/16"]).unwrap();
    for (run, hook) in [(bed.tc(&unused_port).unwrap(), "pod"), (bed.xdp(&unused_port).unwrap(), "external")]
    {
        let icmp = parse_port_unreachable(&run.frame);
        assert_eq!(icmp.to, Ipv4Addr::from(POD_CLIENT), "{hook}: port unreachable back to the client");
    }
    let udp_port = udp((POD_CLIENT, 40001), (CLUSTER_IP, 53), b"q");
    assert_eq!(
        parse_port_unreachable(&bed.tc(&udp_port).unwrap().frame).to,
        Ipv4Addr::from(POD_CLIENT),
        "UDP too"
    );
    let unallocated = tcp((POD_CLIENT, 40002), ([10, 96, 7, 7], 80), "S", b"");
    assert_eq!(bed.tc(&unallocated).unwrap().action, TC_ACT_SHOT);
    assert_eq!(bed.xdp(&unallocated).unwrap().action, XDP_DROP);
    // The service's own port, and addresses outside the CIDR, are untouched.
    assert_eq!(
        parse_checked(&bed.tc(&tcp((POD_CLIENT, 40003), (CLUSTER_IP, 80), "S", b"")).unwrap().frame).dst,
        (LOCAL_POD, 8080)
    );
    assert_eq!(bed.tc(&tcp((POD_CLIENT, 40004), ([10, 97, 0, 1], 80), "S", b"")).unwrap().action, TC_ACT_OK);
    assert_eq!(drops(&bed, Drop::ClusterIpPort), 3);
    assert_eq!(drops(&bed, Drop::UnallocatedClusterIp), 2);
    assert_eq!(drops(&bed, Drop::Rejected), 0, "counted apart from services without endpoints");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn traffic_policy_local_without_local_endpoint_drops() {
    let mut bed = bed();
    let mut fe = desired(FrontendKind::NodePort, &[]);
    fe.local_only = true;
    bed.program(frontend([0; 4], 30081, L4::Tcp), fe).unwrap();
    let out = bed.xdp(&tcp((EXT_CLIENT, 50000), (NODE_ADDR, 30081), "S", b"")).unwrap();
    assert_eq!(out.action, XDP_DROP);
    assert_eq!(drops(&bed, Drop::NoLocalEndpoint), 1);
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn source_ranges_admit_only_listed_clients() {
    let mut bed = bed();
    let mut fe = desired(FrontendKind::LoadBalancer, &[Be::local(LOCAL_POD, 8443)]);
    fe.source_ranges = vec!["192.0.2.0/25".parse().unwrap()];
    bed.program(frontend(LB_IP, 443, L4::Tcp), fe).unwrap();
    let out = bed.xdp(&tcp((EXT_CLIENT, 50000), (LB_IP, 443), "S", b"")).unwrap();
    assert_eq!(parse_checked(&out.frame).dst, (LOCAL_POD, 8443));
    let out = bed.xdp(&tcp(([192, 0, 2, 200], 50000), (LB_IP, 443), "S", b"")).unwrap();
    assert_eq!(out.action, XDP_DROP, "192.0.2.200 is outside 192.0.2.0/25");
    assert_eq!(drops(&bed, Drop::SourceRange), 1);
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn source_ranges_holding_a_node_address_also_admit_the_node_and_the_lb_ip() {
    // Programmed from a Service, as the agent derives it: the ranges hold
    // this node's address, so kube-proxy admits the LB IP as a source too
    // (a node that holds the VIP sends to it from the VIP).
    let dir = lb_tests::netns::TempDir::new("sr").unwrap();
    std::fs::write(
        dir.join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: guarded, namespace: default}\nspec:\n  type: LoadBalancer\n  \
         clusterIP: 10.96.0.60\n  loadBalancerSourceRanges: [\"192.0.2.0/28\"]\n  ports: [{port: 443, targetPort: 8443, \
         nodePort: 30600}]\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.10}]}}\n---\napiVersion: discovery.k8s.io/v1\n\
         kind: EndpointSlice\nmetadata:\n  name: guarded-1\n  namespace: default\n  labels: {kubernetes.io/service-name: guarded}\n\
         addressType: IPv4\nports: [{port: 8443}]\nendpoints: [{addresses: [\"10.244.1.7\"], nodeName: node-1}]\n",
    )
    .unwrap();
    let state = lb_userspace::sources::manifests::load(&dir).unwrap().state;
    let node = lb_userspace::model::NodeInfo {
        name: "node-1".into(),
        addresses: vec![NODE_ADDR.into()],
        ..Default::default()
    };
    let desired = lb_userspace::model::desired_state(&state, &node);
    let key = frontend(LB_IP, 443, L4::Tcp);
    let mut bed = bed();
    bed.program(key, (*desired.frontends[&key]).clone()).unwrap();
    for (source, admitted) in [(NODE_ADDR, true), (LB_IP, true), ([192, 0, 2, 9], true), (EXT_CLIENT, false)]
    {
        let out = bed.xdp(&tcp((source, 50000), (LB_IP, 443), "S", b"")).unwrap();
        if admitted {
            assert_eq!(parse_checked(&out.frame).dst, (LOCAL_POD, 8443), "{source:?} is admitted");
        } else {
            assert_eq!(out.action, XDP_DROP, "{source:?} is outside the ranges");
        }
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn session_affinity_keeps_a_client_on_one_backend() {
    let mut bed = bed();
    let backends: Vec<Be> = (1..=8).map(|i| Be::local([10, 244, 1, 10 + i], 8080)).collect();
    let mut fe = desired(FrontendKind::ClusterIp, &backends);
    fe.affinity_timeout = Some(10_800);
    bed.program(frontend(CLUSTER_IP, 80, L4::Tcp), fe).unwrap();
    let first =
        parse_checked(&bed.tc(&tcp((POD_CLIENT, 40000), (CLUSTER_IP, 80), "S", b"")).unwrap().frame).dst;
    for port in 40001..40030 {
        let dst =
            parse_checked(&bed.tc(&tcp((POD_CLIENT, port), (CLUSTER_IP, 80), "S", b"")).unwrap().frame).dst;
        assert_eq!(dst, first, "connection from port {port}");
    }
    // Without affinity, 30 connections over 8 backends use more than one.
    let mut bed = self::bed();
    bed.service(frontend(CLUSTER_IP, 80, L4::Tcp), FrontendKind::ClusterIp, &backends).unwrap();
    let mut seen = std::collections::HashSet::new();
    for port in 40000..40030 {
        seen.insert(
            parse_checked(&bed.tc(&tcp((POD_CLIENT, port), (CLUSTER_IP, 80), "S", b"")).unwrap().frame).dst,
        );
    }
    assert!(seen.len() > 1, "random selection spread over {} backends", seen.len());
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn a_removed_backend_moves_udp_flows_and_keeps_tcp_connections() {
    let mut bed = bed();
    let backends = [Be::local([10, 244, 1, 21], 8080), Be::local([10, 244, 1, 22], 8080)];
    for l4 in [L4::Tcp, L4::Udp] {
        bed.service(frontend(CLUSTER_IP, 80, l4), FrontendKind::ClusterIp, &backends).unwrap();
    }
    let tcp_first =
        parse_checked(&bed.tc(&tcp((POD_CLIENT, 40000), (CLUSTER_IP, 80), "S", b"")).unwrap().frame).dst;
    let datagram = udp((POD_CLIENT, 40000), (CLUSTER_IP, 80), b"x");
    let udp_first = parse_checked(&bed.tc(&datagram).unwrap().frame).dst;
    let data = tcp((POD_CLIENT, 40000), (CLUSTER_IP, 80), "A", b"x");
    for _ in 0..10 {
        assert_eq!(parse_checked(&bed.tc(&data).unwrap().frame).dst, tcp_first);
        assert_eq!(parse_checked(&bed.tc(&datagram).unwrap().frame).dst, udp_first);
    }
    // Each chosen backend leaves its Service (an endpoint change): the UDP
    // flow moves to the live one at once (kube-proxy flushes UDP
    // conntrack); the TCP connection keeps its backend, as with kube-proxy.
    for (l4, first) in [(L4::Tcp, tcp_first), (L4::Udp, udp_first)] {
        bed.update(frontend(CLUSTER_IP, 80, l4), |fe| {
            fe.backends.retain(|b| (b.addr, b.port) != (first.0.into(), first.1))
        })
        .unwrap();
    }
    let udp_other = backends.iter().map(|b| (b.addr, b.port)).find(|a| *a != udp_first).unwrap();
    assert_eq!(parse_checked(&bed.tc(&datagram).unwrap().frame).dst, udp_other);
    assert_eq!(parse_checked(&bed.tc(&data).unwrap().frame).dst, tcp_first);
    // New connections avoid the removed backend.
    let tcp_other = backends.iter().map(|b| (b.addr, b.port)).find(|a| *a != tcp_first).unwrap();
    for port in 41000..41010 {
        let syn = tcp((POD_CLIENT, port), (CLUSTER_IP, 80), "S", b"");
        assert_eq!(parse_checked(&bed.tc(&syn).unwrap().frame).dst, tcp_other);
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn a_udp_flow_moves_when_its_backend_leaves_its_service_though_another_service_keeps_it() {
    let mut bed = bed();
    let (a, b) = (Be::local([10, 244, 1, 21], 5353), Be::local([10, 244, 1, 22], 5353));
    bed.service(frontend(CLUSTER_IP, 53, L4::Udp), FrontendKind::ClusterIp, &[a]).unwrap();
    // Another Service selects the same pod on the same port: one backend entry.
    bed.service(frontend([10, 96, 0, 11], 53, L4::Udp), FrontendKind::ClusterIp, &[a]).unwrap();
    let datagram = udp((POD_CLIENT, 40000), (CLUSTER_IP, 53), b"x");
    assert_eq!(parse_checked(&bed.tc(&datagram).unwrap().frame).dst, (a.addr, a.port));
    bed.update(frontend(CLUSTER_IP, 53, L4::Udp), |fe| {
        fe.backends = vec![DesiredBackend { addr: b.addr.into(), port: b.port, local: true }];
    })
    .unwrap();
    assert!(bed.backend_id(a.addr, a.port, L4::Udp).is_some(), "the other Service still has it");
    assert_eq!(parse_checked(&bed.tc(&datagram).unwrap().frame).dst, (b.addr, b.port), "the flow moved");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn closed_tcp_flow_starts_over_on_a_new_syn() {
    let mut bed = bed();
    bed.service(frontend(CLUSTER_IP, 80, L4::Tcp), FrontendKind::ClusterIp, &[Be::local(LOCAL_POD, 8080)])
        .unwrap();
    let key = CtKey::new(POD_CLIENT, CLUSTER_IP, 40000, 80, IPPROTO_TCP);
    bed.tc(&tcp((POD_CLIENT, 40000), (CLUSTER_IP, 80), "S", b"")).unwrap();
    bed.tc(&tcp((POD_CLIENT, 40000), (CLUSTER_IP, 80), "R", b"")).unwrap();
    let e = ct(&bed, key).unwrap();
    assert_ne!(e.tcp & lb_common::ct_tcp::RST, 0, "RST recorded: the entry now expires after 10 s");
    bed.tc(&tcp((POD_CLIENT, 40000), (CLUSTER_IP, 80), "S", b"")).unwrap();
    let e = ct(&bed, key).unwrap();
    assert_eq!(e.tcp, lb_common::ct_tcp::SYN, "a new SYN replaced the closed entry");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn a_direct_connection_reusing_a_closed_flows_ports_is_not_rewritten() {
    let mut bed = bed();
    bed.service(frontend(CLUSTER_IP, 80, L4::Tcp), FrontendKind::ClusterIp, &[Be::local(LOCAL_POD, 8080)])
        .unwrap();
    let (client, vip, pod) = ((POD_CLIENT, 40000), (CLUSTER_IP, 80), (LOCAL_POD, 8080));
    // A service connection, closed from both ends.
    bed.tc(&tcp(client, vip, "S", b"")).unwrap();
    assert_eq!(parse_checked(&bed.tc(&tcp(pod, client, "SA", b"")).unwrap().frame).src, vip);
    bed.tc(&tcp(pod, client, "FA", b"")).unwrap();
    bed.tc(&tcp(client, vip, "FA", b"")).unwrap();
    // The same client port, now straight to the pod (as the socket hooks
    // connect, or a client dialling the pod): the pod's answers keep
    // their own source.
    assert_eq!(bed.tc(&tcp(client, pod, "S", b"")).unwrap().frame, tcp(client, pod, "S", b""));
    for flags in ["SA", "AP"] {
        let answer = tcp(pod, client, flags, b"");
        let out = bed.tc(&answer).unwrap();
        assert_eq!(parse_checked(&out.frame).src, pod, "{flags} from the pod left as it is");
    }
    assert!(
        ct(&bed, CtKey::new(LOCAL_POD, POD_CLIENT, 8080, 40000, IPPROTO_TCP)).is_none(),
        "stale entry gone"
    );
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn udp_without_checksum_keeps_zero_and_vlan_tag_is_kept() {
    let mut bed = bed();
    bed.service(frontend(EXTERNAL_IP, 53, L4::Udp), FrontendKind::ExternalIp, &[Be::local(LOCAL_POD, 5353)])
        .unwrap();
    let out = bed.xdp(&packet::udp_no_checksum((EXT_CLIENT, 40000), (EXTERNAL_IP, 53), b"q")).unwrap();
    let seen = parse_checked(&out.frame);
    assert_eq!(seen.dst, (LOCAL_POD, 5353));
    assert_eq!(seen.l4_checksum, 0, "UDP checksum 0 stays 0");

    let tagged = packet::with_vlan(&tcp((EXT_CLIENT, 40001), (EXTERNAL_IP, 53), "S", b""));
    bed.service(frontend(EXTERNAL_IP, 53, L4::Tcp), FrontendKind::ExternalIp, &[Be::local(LOCAL_POD, 5353)])
        .unwrap();
    let out = bed.xdp(&tagged).unwrap();
    assert_eq!(out.action, XDP_PASS);
    assert_eq!(&out.frame[12..16], &[0x81, 0x00, 0x00, 100], "tag kept");
    let seen = parse_checked(&out.frame);
    assert_eq!(seen.dst, (LOCAL_POD, 5353));
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn a_datagram_in_fragments_is_translated_whole_both_ways() {
    let mut bed = bed();
    let id = bed
        .service(frontend(CLUSTER_IP, 53, L4::Udp), FrontendKind::ClusterIp, &[Be::remote(REMOTE_POD, 5353)])
        .unwrap();
    // 2,000 bytes over a 1,500-byte MTU: two fragments, and a third here to
    // have a middle one.
    let request: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8).collect();
    let whole = udp((POD_CLIENT, 40000), (CLUSTER_IP, 53), &request);
    let sent = packet::fragments(&whole, 0x1234, 808);
    assert_eq!(sent.len(), 3);
    let out: Vec<Vec<u8>> = sent
        .iter()
        .map(|f| {
            let run = bed.tc(f).unwrap();
            assert_eq!(run.action, TC_ACT_OK);
            run.frame
        })
        .collect();
    let seen = packet::reassemble(&out);
    let checked = parse_checked(&seen);
    assert_eq!((checked.src, checked.dst), ((POD_CLIENT, 40000), (REMOTE_POD, 5353)));
    assert_eq!(&seen[14 + 20 + 8..], &request[..], "payload intact");

    // The backend's answer, as large, comes back in fragments too.
    let answer = udp((REMOTE_POD, 5353), (POD_CLIENT, 40000), &request);
    // (At XDP, as from another node; at TC, as from a local backend.)
    let answered = packet::fragments(&answer, 0x4321, 1480);
    for hook in ["xdp", "tc"] {
        let out: Vec<Vec<u8>> = answered
            .iter()
            .map(|f| {
                let (run, pass) = if hook == "xdp" { (bed.xdp(f), XDP_PASS) } else { (bed.tc(f), TC_ACT_OK) };
                let run = run.unwrap();
                assert_eq!(run.action, pass, "{hook}");
                run.frame
            })
            .collect();
        let checked = parse_checked(&packet::reassemble(&out));
        assert_eq!((checked.src, checked.dst), ((CLUSTER_IP, 53), (POD_CLIENT, 40000)), "{hook}");
    }

    let stats = bed.maps.svc_stats.get(&id, 0).unwrap();
    let (packets, bytes): (u64, u64) = stats.iter().fold((0, 0), |(p, b), s| (p + s.packets, b + s.bytes));
    assert_eq!(packets, 7, "every fragment counted against the service");
    let ip_bytes = |frames: &[Vec<u8>]| frames.iter().map(|f| f.len() as u64 - 14).sum::<u64>();
    assert_eq!(bytes, ip_bytes(&sent) + 2 * ip_bytes(&answered));

    // Another datagram of the same flow whose first fragment was not seen
    // (reordered, or lost): its later fragments pass as they are.
    let orphan = &packet::fragments(&whole, 0x5555, 808)[1];
    let run = bed.tc(orphan).unwrap();
    assert_eq!((run.action, &run.frame), (TC_ACT_OK, orphan));

    // The IP id comes round again, on a datagram to a port no Service has:
    // its first fragment passes, and so do the later ones, whatever the
    // earlier datagram with that id got.
    let other = packet::fragments(&udp((POD_CLIENT, 40000), (CLUSTER_IP, 54), &request), 0x1234, 808);
    for f in &other {
        let run = bed.tc(f).unwrap();
        assert_eq!((run.action, &run.frame), (TC_ACT_OK, f), "not translated");
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn replies_of_an_endpoint_on_the_nodes_own_address_are_translated_at_egress() {
    let mut bed = bed();
    let host_reply = tcp((NODE_ADDR, 8080), (POD_CLIENT, 40000), "SA", b"");
    // No endpoint on the node's address: egress leaves everything alone.
    bed.service(frontend(CLUSTER_IP, 80, L4::Tcp), FrontendKind::ClusterIp, &[Be::local(LOCAL_POD, 8080)])
        .unwrap();
    let out = bed.tc_egress(&host_reply).unwrap();
    assert_eq!((out.action, &out.frame), (TC_ACT_OK, &host_reply));

    // A hostNetwork endpoint: the node's own address.
    bed.service(frontend(CLUSTER_IP, 80, L4::Tcp), FrontendKind::ClusterIp, &[Be::local(NODE_ADDR, 8080)])
        .unwrap();
    let out = bed.tc(&tcp((POD_CLIENT, 40000), (CLUSTER_IP, 80), "S", b"")).unwrap();
    assert_eq!((out.action, parse_checked(&out.frame).dst), (TC_ACT_OK, (NODE_ADDR, 8080)));
    // Its reply leaves the host stack toward the pod: through egress only.
    let out = bed.tc_egress(&host_reply).unwrap();
    assert_eq!(out.action, TC_ACT_OK);
    let seen = parse_checked(&out.frame);
    assert_eq!((seen.src, seen.dst), ((CLUSTER_IP, 80), (POD_CLIENT, 40000)));
    // The host's own traffic, and a pod's forwarded packet, are not touched.
    for frame in [
        tcp((NODE_ADDR, 22), (POD_CLIENT, 40000), "A", b""),
        tcp((LOCAL_POD, 8080), (POD_CLIENT, 40000), "A", b""),
    ] {
        let out = bed.tc_egress(&frame).unwrap();
        assert_eq!((out.action, &out.frame), (TC_ACT_OK, &frame));
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn sctp_is_translated_both_ways_with_its_crc_patched_for_the_ports() {
    const INIT: u8 = 1;
    const INIT_ACK: u8 = 2;
    let mut bed = bed();
    for (port, target) in [(5060, 5060), (95, 8082)] {
        bed.service(
            frontend(CLUSTER_IP, port, L4::Sctp),
            FrontendKind::ClusterIp,
            &[Be::remote(REMOTE_POD, target)],
        )
        .unwrap();
        // A CRC the sender computed is patched; one left to offload stays 0.
        for offloaded in [false, true] {
            let crc = if offloaded { None } else { Some(true) };
            let sport = 40000 + port + offloaded as u16;
            let out = bed
                .tc(&packet::sctp((POD_CLIENT, sport), (CLUSTER_IP, port), INIT, b"init", offloaded))
                .unwrap();
            assert_eq!(out.action, TC_ACT_OK);
            let seen = packet::parse_sctp(&out.frame);
            assert_eq!(seen, ((POD_CLIENT, sport), (REMOTE_POD, target), crc), "request to :{port}");
            let entry = ct(&bed, CtKey::new(POD_CLIENT, CLUSTER_IP, sport, port, L4::Sctp.proto()));
            assert!(entry.is_some_and(|e| e.tcp & lb_common::ct_tcp::SYN != 0), "INIT opens the association");
            // The reply, from the other node, at XDP.
            let reply = packet::sctp((REMOTE_POD, target), (POD_CLIENT, sport), INIT_ACK, b"ack", offloaded);
            let out = bed.xdp(&reply).unwrap();
            assert_eq!(out.action, XDP_PASS);
            let seen = packet::parse_sctp(&out.frame);
            assert_eq!(seen, ((CLUSTER_IP, port), (POD_CLIENT, sport), crc), "reply from :{target}");
        }
    }
    // From outside through a NodePort to the other node: ports and source
    // rewritten, the CRC still right.
    bed.service(frontend([0; 4], 30060, L4::Sctp), FrontendKind::NodePort, &[Be::remote(REMOTE_POD, 5060)])
        .unwrap();
    let out = bed.xdp(&packet::sctp((EXT_CLIENT, 50000), (NODE_ADDR, 30060), INIT, b"init", false)).unwrap();
    let (src, dst, crc) = packet::parse_sctp(&out.frame);
    assert_eq!((src.0, dst, crc), (NODE_ADDR, (REMOTE_POD, 5060), Some(true)));
    // An SCTP packet without a chunk, and a first fragment, pass as they are.
    let bare = packet::sctp((POD_CLIENT, 41000), (CLUSTER_IP, 5060), INIT, b"", false);
    let no_chunk = {
        let mut f = bare[..14 + 20 + 12].to_vec();
        f[14 + 2..14 + 4].copy_from_slice(&32u16.to_be_bytes());
        f
    };
    let mut first_fragment = bare.clone();
    first_fragment[14 + 6] = 0x20;
    for frame in [no_chunk, first_fragment] {
        let out = bed.tc(&frame).unwrap();
        assert_eq!((out.action, &out.frame), (TC_ACT_OK, &frame));
    }
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn non_service_and_malformed_traffic_is_passed_untouched() {
    let mut bed = bed();
    bed.service(frontend(CLUSTER_IP, 80, L4::Tcp), FrontendKind::ClusterIp, &[Be::local(LOCAL_POD, 8080)])
        .unwrap();
    let to_service = tcp((EXT_CLIENT, 50000), (CLUSTER_IP, 80), "S", b"");

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("other address", tcp((EXT_CLIENT, 50000), ([10, 96, 0, 11], 80), "S", b"")),
        ("other port", tcp((EXT_CLIENT, 50000), (CLUSTER_IP, 81), "S", b"")),
        ("other protocol", udp((EXT_CLIENT, 50000), (CLUSTER_IP, 80), b"")),
        ("truncated in the IP header", to_service[..14 + 10].to_vec()),
        ("truncated in the TCP header", to_service[..14 + 20 + 10].to_vec()),
        // (Frames shorter than an Ethernet header never reach XDP or TC:
        // BPF_PROG_TEST_RUN refuses them like the drivers do.)
        ("Ethernet header only", to_service[..14].to_vec()),
    ];
    let mut icmp = Vec::new();
    etherparse::PacketBuilder::ethernet2(packet::CLIENT_MAC, packet::NODE_MAC)
        .ipv4(EXT_CLIENT, CLUSTER_IP, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut icmp, b"ping")
        .unwrap();
    cases.push(("ICMP", icmp));
    let mut later_fragment = to_service.clone();
    later_fragment[14 + 7] = 0x10; // offset != 0, and no first fragment seen
    cases.push(("later fragment of an unknown datagram", later_fragment));
    let mut short_first = to_service[..14 + 20 + 16].to_vec();
    short_first[14 + 2..14 + 4].copy_from_slice(&36u16.to_be_bytes());
    short_first[14 + 6] = 0x20; // more fragments
    cases.push(("first fragment cut inside the TCP header", short_first));
    let mut long_total = to_service.clone();
    long_total[14 + 2..14 + 4].copy_from_slice(&1500u16.to_be_bytes());
    cases.push(("total length beyond the frame", long_total));
    let mut bad_ihl = to_service.clone();
    bad_ihl[14] = 0x43;
    cases.push(("IHL below 5", bad_ihl));
    let mut bad_version = to_service.clone();
    bad_version[14] = 0x65;
    cases.push(("IP version 6 in an IPv4 frame", bad_version));
    let mut bad_doff = to_service.clone();
    bad_doff[14 + 20 + 12] = 0x30;
    cases.push(("TCP data offset below 5", bad_doff));
    let mut arp = to_service.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    cases.push(("ARP ethertype", arp));

    for (what, frame) in cases {
        let out = bed.xdp(&frame).unwrap_or_else(|e| panic!("XDP test run of {what}: {e:#}"));
        assert_eq!(out.action, XDP_PASS, "XDP: {what}");
        assert_eq!(out.frame, frame, "XDP rewrote {what}");
        // An IPv4 frame without a whole IPv4 header cannot be made into a
        // socket buffer: BPF_PROG_TEST_RUN refuses it (as the stack would).
        let ip_header_cut = frame.len() < 14 + 20 && frame[12..14] == [0x08, 0x00];
        if ip_header_cut {
            assert!(bed.tc(&frame).is_err(), "TC: the kernel built an skb from {what}");
            continue;
        }
        let out = bed.tc(&frame).unwrap_or_else(|e| panic!("TC test run of {what}: {e:#}"));
        assert_eq!(out.action, TC_ACT_OK, "TC: {what}");
        assert_eq!(out.frame, frame, "TC rewrote {what}");
    }
    assert_eq!(bed.maps.conntrack.iter().count(), 0, "nothing was tracked");
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn pinned_maps_dump_with_field_names() {
    let mut bed = bed();
    bed.service(frontend(CLUSTER_IP, 80, L4::Tcp), FrontendKind::ClusterIp, &[Be::local(LOCAL_POD, 8080)])
        .unwrap();
    let pin = bed.pin_dir.join(registry::SERVICES.name);
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&pin)
        .output()
        .expect("bpftool runs (installed by `cargo xtask setup`)");
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let dump = String::from_utf8_lossy(&out.stdout);
    for field in
        ["\"addr\"", "\"port\"", "\"proto\"", "\"backend_count\"", "\"kind\"", "\"affinity_timeout\""]
    {
        assert!(dump.contains(field), "field {field} missing from {dump}");
    }
    // Every map the registry pins is there, and no other.
    for map in registry::MAPS {
        assert_eq!(bed.pin_dir.join(map.name).exists(), map.pinned, "{} pinned: {}", map.name, map.pinned);
    }
    // The Service each frontend serves is there too, by name.
    let names = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(bed.pin_dir.join(registry::SERVICE_NAMES.name))
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&names.stdout);
    for field in ["\"namespace\"", "\"name\"", "\"port\""] {
        assert!(names.contains(field), "field {field} missing from {names}");
    }
}

/// Collects the programs' aya-log records.
struct Capture(std::sync::Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        self.0.lock().unwrap().push(format!("{} {}", record.level(), record.args()));
    }
    fn flush(&self) {}
}

#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn programs_log_rejects_and_drops() {
    // The programs log at the level in force when they are loaded.
    log::set_max_level(log::LevelFilter::Debug);
    let mut bed = bed();
    static CAPTURE: Capture = Capture(std::sync::Mutex::new(Vec::new()));
    let mut logger = aya_log::EbpfLogger::init_with_logger(&mut bed.ebpf, &CAPTURE).expect("log map");
    bed.service(frontend(CLUSTER_IP, 53, L4::Udp), FrontendKind::ClusterIp, &[]).unwrap();
    bed.tc(&udp((POD_CLIENT, 40000), (CLUSTER_IP, 53), b"q")).unwrap();
    logger.flush();
    let lines = CAPTURE.0.lock().unwrap().clone();
    assert!(
        lines.iter().any(|l| l.contains("tc reject") && l.contains("10.244.1.5:40000")),
        "the reject was logged: {lines:?}"
    );
}

/// A source-NATed flow is sent back out by the next hop the FIB gave for its
/// destination, cached per CPU; once the cache runs out the FIB is asked
/// again, and a changed neighbour is followed. (In a namespace with a route
/// and a neighbour, so the FIB helper answers; runs pinned to CPU 0, whose
/// cache is the one read.)
#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn translated_packets_reuse_the_cached_next_hop() {
    lb_tests::require_root();
    let wire = Wire::new().expect("namespace with a route to the backends");
    let (mut lb, _) = bench::load_lb(1, 1).expect("load the dataplane");
    let mut cache: PerCpuArray<_, NextHop> =
        PerCpuArray::try_from(lb.ebpf.take_map("lb_next_hops").expect("lb_next_hops")).unwrap();
    let program: &aya::programs::Xdp = lb.ebpf.program("lb_xdp").unwrap().try_into().unwrap();
    let vip = bench::vip_of(0).octets();
    let backend = bench::endpoints_of(0, 1)[0].octets();
    let slot = lb_common::next_hop_slot(backend);
    let send = |flags: &str| {
        let frame = tcp((bench::CLIENT, 40000), (vip, 80), flags, b"");
        let (action, out) = wire
            .ns
            .enter(|| {
                let mut cpu0 = nix::sched::CpuSet::new();
                cpu0.set(0).unwrap();
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu0).unwrap();
                bench::run_on(program, &frame, wire.ifindex)
            })
            .unwrap()
            .unwrap();
        assert_eq!(action, XDP_TX, "routed back out of the ingress interface");
        <[u8; 6]>::try_from(&out[..6]).unwrap()
    };

    assert_eq!(send("S"), NEXT_HOP_MAC);
    let cached = cache.get(&slot, 0).unwrap()[0];
    assert_eq!(
        (cached.ingress, cached.oif, cached.daddr, cached.dmac),
        (wire.ifindex, wire.ifindex, backend, NEXT_HOP_MAC)
    );

    // The neighbour moves; the cached answer still applies for now.
    let moved = [0x02, 0, 0, 0, 0, 0x13];
    let mac = moved.map(|b| format!("{b:02x}")).join(":");
    wire.ns.ip(&["neigh", "replace", NEXT_HOP, "lladdr", &mac, "dev", "ext0", "nud", "permanent"]).unwrap();
    assert_eq!(send("A"), NEXT_HOP_MAC);

    // Expired, the FIB is asked again and the new neighbour is used.
    let expired: Vec<NextHop> =
        cache.get(&slot, 0).unwrap().iter().map(|hop| NextHop { until: 0, ..*hop }).collect();
    cache.set(slot, aya::maps::PerCpuValues::try_from(expired).unwrap(), 0).unwrap();
    assert_eq!(send("A"), moved);
    assert_eq!(cache.get(&slot, 0).unwrap()[0].dmac, moved);
}

/// externalTrafficPolicy Local on a node without a local endpoint: an
/// outside client is dropped, a pod reaches the cluster's endpoints through
/// the frontend's internal twin (kube-proxy's "pod traffic for external
/// destinations").
#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn in_cluster_clients_of_a_local_policy_frontend_use_its_internal_twin() {
    let mut bed = bed();
    for (key, kind, sport) in [
        (frontend([0; 4], 30090, L4::Tcp), FrontendKind::NodePort, 40000),
        (frontend(LB_IP, 80, L4::Tcp), FrontendKind::LoadBalancer, 40001),
        (frontend(EXTERNAL_IP, 80, L4::Tcp), FrontendKind::ExternalIp, 40002),
    ] {
        let mut external = desired(kind, &[]);
        external.local_only = true;
        external.two_scopes = true;
        external.standby = desired(kind, &[Be::remote(REMOTE_POD, 8080)]).backends;
        bed.program(internal(key), desired(kind, &[Be::remote(REMOTE_POD, 8080)])).unwrap();
        bed.program(key, external).unwrap();
        let dst = match key.ip {
            std::net::IpAddr::V4(ip) if !ip.is_unspecified() => ip.octets(),
            _ => NODE_ADDR,
        };

        let out = bed.xdp(&tcp((EXT_CLIENT, 50000), (dst, key.port), "S", b"")).unwrap();
        assert_eq!(out.action, XDP_DROP, "{kind:?}: an outside client gets no local endpoint");
        let out = bed.tc(&tcp((POD_CLIENT, sport), (dst, key.port), "S", b"")).unwrap();
        assert_eq!(out.action, TC_ACT_OK, "{kind:?}");
        let seen = parse_checked(&out.frame);
        assert_eq!(
            (seen.src, seen.dst),
            ((POD_CLIENT, sport), (REMOTE_POD, 8080)),
            "{kind:?}: a pod gets the cluster's"
        );
        let reply = bed.xdp(&tcp((REMOTE_POD, 8080), (POD_CLIENT, sport), "SA", b"")).unwrap();
        assert_eq!(
            parse_checked(&reply.frame).src,
            (dst, key.port),
            "{kind:?}: the reply comes from what the pod dialed"
        );
    }
    assert_eq!(drops(&bed, Drop::NoLocalEndpoint), 3);
}

/// A NodePort answers on the node's addresses only: 0.0.0.0 (which the
/// wildcard key uses) and other addresses pass untouched.
#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn a_node_port_is_not_served_on_the_unspecified_address() {
    let mut bed = bed();
    bed.service(frontend([0; 4], 30080, L4::Tcp), FrontendKind::NodePort, &[Be::local(LOCAL_POD, 8080)])
        .unwrap();
    for dst in [[0, 0, 0, 0], [192, 0, 2, 99]] {
        let frame = tcp((EXT_CLIENT, 50000), (dst, 30080), "S", b"");
        for (what, out) in [("xdp", bed.xdp(&frame).unwrap()), ("tc", bed.tc(&frame).unwrap())] {
            assert_eq!(out.frame, frame, "{what}: a frame to {dst:?} was rewritten");
        }
    }
    assert_eq!(bed.maps.conntrack.iter().count(), 0);
}

/// TC on external interfaces: the same translations as XDP (run on the
/// test run's own device, so no forwarding decision).
#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn tc_on_external_interfaces_translates_as_xdp_does() {
    let mut bed = bed();
    bed.service(frontend([0; 4], 30080, L4::Tcp), FrontendKind::NodePort, &[Be::remote(REMOTE_POD, 8080)])
        .unwrap();
    bed.service(frontend(LB_IP, 80, L4::Udp), FrontendKind::LoadBalancer, &[Be::local(LOCAL_POD, 5353)])
        .unwrap();
    bed.service(frontend(CLUSTER_IP, 80, L4::Tcp), FrontendKind::ClusterIp, &[]).unwrap();
    let mut local = desired(FrontendKind::NodePort, &[]);
    local.local_only = true;
    bed.program(frontend([0; 4], 30081, L4::Tcp), local).unwrap();

    let out = bed.tc_ext(&tcp((EXT_CLIENT, 50000), (NODE_ADDR, 30080), "S", b"")).unwrap();
    let seen = parse_checked(&out.frame);
    assert_eq!((seen.src.0, seen.dst), (NODE_ADDR, (REMOTE_POD, 8080)), "SNAT + DNAT");
    let reply = bed.tc_ext(&tcp((REMOTE_POD, 8080), seen.src, "SA", b"")).unwrap();
    assert_eq!(parse_checked(&reply.frame).src, (NODE_ADDR, 30080));
    assert_eq!(parse_checked(&reply.frame).dst, (EXT_CLIENT, 50000));

    let out = bed.tc_ext(&packet::udp_no_checksum((EXT_CLIENT, 40000), (LB_IP, 80), b"q")).unwrap();
    let seen = parse_checked(&out.frame);
    assert_eq!((seen.dst, seen.l4_checksum), ((LOCAL_POD, 5353), 0), "UDP without checksum keeps 0");

    let out = bed.tc_ext(&tcp((EXT_CLIENT, 50001), (CLUSTER_IP, 80), "S", b"")).unwrap();
    assert_eq!(out.action, TC_ACT_REDIRECT, "port unreachable, back out of the same device");
    assert_eq!(parse_port_unreachable(&out.frame).to, std::net::Ipv4Addr::from(EXT_CLIENT));
    let out = bed.tc_ext(&tcp((EXT_CLIENT, 50002), (NODE_ADDR, 30081), "S", b"")).unwrap();
    assert_eq!(out.action, TC_ACT_SHOT, "traffic policy Local, nothing local: drop");

    // A frame a switch flooded here, for another host: not ours to touch.
    let mut flooded = tcp((EXT_CLIENT, 50003), (NODE_ADDR, 30080), "S", b"");
    flooded[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    let p: &aya::programs::SchedClassifier =
        bed.ebpf.program(lb_userspace::loader::TC_EXT_PROGRAM).unwrap().try_into().unwrap();
    let mut out = vec![0u8; flooded.len() + 64];
    let r = aya::programs::TestRun::test_run(
        p,
        aya::programs::TestRunOptions {
            data_in: Some(&flooded),
            data_out: Some(&mut out),
            ..Default::default()
        },
    )
    .unwrap();
    out.truncate(r.data_size_out as usize);
    assert_eq!((r.return_value, out), (TC_ACT_OK, flooded), "another host's frame was translated");
}

/// A node in a namespace: `ext0` (192.0.2.11/24) toward the client and the
/// other node, `lbp0` toward a local pod, neighbours fixed.
struct TcNode {
    ns: lb_tests::netns::Netns,
    ext: u32,
    ext_mac: [u8; 6],
    pod_if: u32,
    pod_if_mac: [u8; 6],
}

const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x07];

fn tc_node() -> TcNode {
    let ns = lb_tests::netns::Netns::new("t").unwrap();
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    let mac = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
    for (a, b) in [("ext0", "ext1"), ("lbp0", "lbp0p")] {
        ns.ip(&["link", "add", "name", a, "type", "veth", "peer", "name", b]).unwrap();
        ns.ip(&["link", "set", a, "up"]).unwrap();
        ns.ip(&["link", "set", b, "up"]).unwrap();
    }
    ns.ip(&["addr", "add", "192.0.2.11/24", "dev", "ext0"]).unwrap();
    ns.ip(&[
        "neigh",
        "add",
        "192.0.2.100",
        "lladdr",
        &mac(packet::CLIENT_MAC),
        "dev",
        "ext0",
        "nud",
        "permanent",
    ])
    .unwrap();
    ns.ip(&["neigh", "add", NEXT_HOP, "lladdr", &mac(NEXT_HOP_MAC), "dev", "ext0", "nud", "permanent"])
        .unwrap();
    ns.ip(&["route", "add", "10.244.2.0/24", "via", NEXT_HOP, "dev", "ext0"]).unwrap();
    ns.ip(&["route", "add", "10.244.1.7/32", "dev", "lbp0"]).unwrap();
    ns.ip(&["neigh", "add", "10.244.1.7", "lladdr", &mac(POD_MAC), "dev", "lbp0", "nud", "permanent"])
        .unwrap();
    let mac_of = |dev: &str| {
        let out = ns.ip(&["-o", "link", "show", "dev", dev]).unwrap();
        let text =
            out.split("link/ether ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().to_string();
        let b: Vec<u8> = text.split(':').map(|x| u8::from_str_radix(x, 16).unwrap()).collect();
        <[u8; 6]>::try_from(b).unwrap()
    };
    let (ext_mac, pod_if_mac) = (mac_of("ext0"), mac_of("lbp0"));
    let (ext, pod_if) = ns
        .enter(|| {
            (nix::net::if_::if_nametoindex("ext0").unwrap(), nix::net::if_::if_nametoindex("lbp0").unwrap())
        })
        .unwrap();
    TcNode { ns, ext, ext_mac, pod_if, pod_if_mac }
}

/// North-south at TC forwards around the host stack: into a local pod
/// (redirect to the peer, the pod's MAC written), toward a remote backend
/// and back to the client (redirect out with the next hop's MAC), one hop
/// less each time; the local pod's reply leaves from its own hook the same
/// way. With `--forwarding stack` all of it goes up the stack instead.
#[test]
#[cfg_attr(not(feature = "root"), ignore = "needs root: `./x test` runs it")]
fn tc_forwards_north_south_flows_around_the_host_stack() {
    let node = tc_node();
    let mut bed = bed();
    bed.maps.set_pod_ifs(&[node.pod_if].into()).unwrap();
    bed.service(frontend([0; 4], 30080, L4::Tcp), FrontendKind::NodePort, &[Be::local(LOCAL_POD, 8080)])
        .unwrap();
    bed.service(frontend([0; 4], 30082, L4::Tcp), FrontendKind::NodePort, &[Be::remote(REMOTE_POD, 8080)])
        .unwrap();
    let to_node = |sport: u16, port: u16, flags: &str| {
        let mut f = tcp((EXT_CLIENT, sport), (NODE_ADDR, port), flags, b"");
        f[..6].copy_from_slice(&node.ext_mac);
        f
    };
    let run = |bed: &Bed, program: &str, frame: &[u8], ifindex: u32| {
        node.ns.enter(|| bed.tc_on(program, frame, ifindex).unwrap()).unwrap()
    };
    use lb_userspace::loader::{TC_EXT_PROGRAM, TC_POD_PROGRAM};

    // Into the local pod.
    let out = run(&bed, TC_EXT_PROGRAM, &to_node(50000, 30080, "S"), node.ext);
    assert_eq!(out.action, TC_ACT_REDIRECT);
    let seen = parse_checked(&out.frame);
    assert_eq!((seen.src, seen.dst, seen.ttl), ((EXT_CLIENT, 50000), (LOCAL_POD, 8080), 63));
    assert_eq!((seen.eth_dst, seen.eth_src), (POD_MAC, node.pod_if_mac), "addressed to the pod");
    // Its reply, at the pod's hook, goes straight back out toward the client.
    let mut reply = tcp((LOCAL_POD, 8080), (EXT_CLIENT, 50000), "SA", b"");
    reply[..6].copy_from_slice(&node.pod_if_mac);
    let out = run(&bed, TC_POD_PROGRAM, &reply, node.pod_if);
    assert_eq!(out.action, TC_ACT_REDIRECT);
    let seen = parse_checked(&out.frame);
    assert_eq!((seen.src, seen.dst, seen.ttl), ((NODE_ADDR, 30080), (EXT_CLIENT, 50000), 63));
    assert_eq!((seen.eth_dst, seen.eth_src), (packet::CLIENT_MAC, node.ext_mac));

    // Toward the remote backend, and its reply back to the client.
    let out = run(&bed, TC_EXT_PROGRAM, &to_node(50001, 30082, "S"), node.ext);
    assert_eq!(out.action, TC_ACT_REDIRECT);
    let seen = parse_checked(&out.frame);
    assert_eq!((seen.src.0, seen.dst, seen.ttl), (NODE_ADDR, (REMOTE_POD, 8080), 63));
    assert_eq!((seen.eth_dst, seen.eth_src), (NEXT_HOP_MAC, node.ext_mac));
    let mut back = tcp((REMOTE_POD, 8080), seen.src, "SA", b"");
    back[..6].copy_from_slice(&node.ext_mac);
    let out = run(&bed, TC_EXT_PROGRAM, &back, node.ext);
    assert_eq!(out.action, TC_ACT_REDIRECT);
    let seen = parse_checked(&out.frame);
    assert_eq!((seen.src, seen.dst), ((NODE_ADDR, 30082), (EXT_CLIENT, 50001)));
    assert_eq!(seen.eth_dst, packet::CLIENT_MAC);

    // Through the stack, when asked.
    bed.set_via_stack(true).unwrap();
    let out = run(&bed, TC_EXT_PROGRAM, &to_node(50002, 30080, "S"), node.ext);
    assert_eq!(out.action, TC_ACT_OK);
    let seen = parse_checked(&out.frame);
    assert_eq!((seen.dst, seen.ttl), ((LOCAL_POD, 8080), 64), "translated, not forwarded");
}
