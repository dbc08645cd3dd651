//! Socket-level load balancing: the cgroup hooks at connect(), sendmsg(),
//! recvmsg() and getpeername().
//!
//! Processes of the node's own network namespace (the kubelet, hostNetwork
//! pods, this agent) send packets that no packet hook sees before routing,
//! so their service addresses are translated where the socket names them:
//! connect() and each unconnected sendmsg() get the backend's address, and
//! recvmsg() and getpeername() give the service address back through
//! `lb_sock_rev`. Nothing is rewritten per packet afterwards. With
//! `--socket-lb all` pods are served the same way, except for frontends with
//! ClientIP affinity or source ranges, which need the client's address (not
//! known before the socket is bound) and stay on the pod's packet path.
//!
//! The lookup and the choice are `lb`'s, in the internal scope: in-cluster
//! clients get Cluster behaviour for externalTrafficPolicy Local, and
//! internalTrafficPolicy Local is honoured.

use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{Drop, SockKey, SockService, frontend_flags};

use crate::{
    lb::{self, Choice, Origin, Unserved},
    maps,
};

/// The agent's network namespace (its cookie), set at load time: sockets
/// there are the node's.
#[unsafe(no_mangle)]
static HOST_NETNS_COOKIE: u64 = 0;

/// Set at load time by `--socket-lb all`: sockets of other namespaces
/// (pods) are served too.
#[unsafe(no_mangle)]
static SOCKET_LB_PODS: u8 = 0;

/// A cgroup socket hook's verdicts.
const PROCEED: i32 = 1;
const FAIL: i32 = 0;

const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// How the call's context holds the peer address.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// An IPv4 socket: `user_ip4`.
    V4,
    /// An IPv6 socket naming an IPv4 peer as `::ffff:a.b.c.d` (dual-stack
    /// sockets, Java's default among them): the last word of `user_ip6`.
    /// Other IPv6 addresses are left alone (IPv6 services come later).
    V4InV6,
}

/// The `::ffff:` prefix of an IPv4-mapped address, as `user_ip6`'s third
/// word holds it.
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The peer's IPv4 address and port, if the context names one.
#[inline(always)]
fn peer(sa: *mut aya_ebpf::bindings::bpf_sock_addr, family: Family) -> Option<([u8; 4], u16)> {
    // SAFETY: the kernel's context for this call; the verifier checks each
    // 4-byte field access.
    unsafe {
        let port = u16::from_be((*sa).user_port as u16);
        match family {
            Family::V4 => Some(((*sa).user_ip4.to_ne_bytes(), port)),
            Family::V4InV6 => {
                let words = [(*sa).user_ip6[0], (*sa).user_ip6[1], (*sa).user_ip6[2]];
                (words == [0, 0, V4_MAPPED]).then(|| ((*sa).user_ip6[3].to_ne_bytes(), port))
            }
        }
    }
}

/// Points the context at `addr:port`, in the family it came in.
#[inline(always)]
fn set_peer(sa: *mut aya_ebpf::bindings::bpf_sock_addr, family: Family, addr: [u8; 4], port: u16) {
    // SAFETY: writable fields of this call's context, written whole (as
    // the verifier requires for the port).
    unsafe {
        match family {
            Family::V4 => (*sa).user_ip4 = u32::from_ne_bytes(addr),
            Family::V4InV6 => (*sa).user_ip6[3] = u32::from_ne_bytes(addr),
        }
        (*sa).user_port = port.to_be() as u32;
    }
}

/// What the hook is doing for the socket.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// connect(): TCP, connected UDP (and SCTP).
    Connect,
    /// sendmsg() with an address on an unconnected UDP socket: each
    /// datagram is translated (and may reach another backend).
    SendMsg,
}

/// connect and sendmsg: the service address becomes a backend's.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext, family: Family, call: Call) -> i32 {
    let sa = ctx.sock_addr;
    let Some(origin) = origin(ctx) else { return PROCEED };
    let Some((daddr, dport)) = peer(sa, family) else { return PROCEED };
    // SAFETY: as in `peer`.
    let proto = unsafe { (*sa).protocol as u8 };
    let Some(fe) = lb::frontend(daddr, dport, proto, origin) else {
        return match lb::unserved(daddr) {
            Unserved::Pass => PROCEED,
            Unserved::Reject => {
                maps::count_drop(Drop::ClusterIpPort);
                fail(ECONNREFUSED)
            }
            Unserved::Drop => {
                maps::count_drop(Drop::UnallocatedClusterIp);
                fail(EHOSTUNREACH)
            }
        };
    };
    if origin == Origin::Pod && fe.flags & (frontend_flags::AFFINITY | frontend_flags::SOURCE_RANGES) != 0 {
        return PROCEED;
    }
    // The node's clients leave from its address (routing picks it for
    // service and pod destinations) unless sendmsg names a source.
    let msg_src = match (call, family) {
        // SAFETY: a field only sendmsg4's context has (the verifier refuses
        // it elsewhere, so it is read on that path alone).
        (Call::SendMsg, Family::V4) => unsafe { core::ptr::read_volatile(&(*sa).msg_src_ip4) }.to_ne_bytes(),
        _ => [0; 4],
    };
    let client = match maps::config() {
        Some(cfg) if msg_src == [0; 4] => cfg.snat_addr,
        _ => msg_src,
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    match lb::choose(&fe, client, now) {
        Choice::Backend(id, backend) => {
            lb::remember(&fe, client, id, now);
            // SAFETY: the socket of this call.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let key = SockKey { cookie, addr: backend.addr, port: backend.port, _pad: 0 };
            maps::set_sock_service(
                &key,
                &SockService { addr: daddr, port: dport, _pad: 0, frontend_id: fe.id },
            );
            set_peer(sa, family, backend.addr, backend.port);
            maps::count_packet(fe.id, 0, true);
            PROCEED
        }
        Choice::Reject => {
            // kube-proxy's REJECT: the client sees ECONNREFUSED at once.
            maps::count_drop(Drop::Rejected);
            fail(ECONNREFUSED)
        }
        Choice::Drop(reason) => {
            // kube-proxy drops (traffic policy Local without a local
            // endpoint, a source outside the ranges): the caller learns it
            // now rather than after a timeout.
            maps::count_drop(reason);
            fail(EHOSTUNREACH)
        }
    }
}

/// recvmsg and getpeername: a backend's address becomes the service's
/// again, for sockets these hooks translated.
#[inline(always)]
pub fn restore(ctx: &SockAddrContext, family: Family) -> i32 {
    let sa = ctx.sock_addr;
    if let Some((addr, port)) = peer(sa, family) {
        // SAFETY: the socket of this call.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if let Some(service) = maps::sock_service(&SockKey { cookie, addr, port, _pad: 0 }) {
            set_peer(sa, family, service.addr, service.port);
        }
    }
    // These hooks may only proceed.
    PROCEED
}

/// Whose socket this is, if it is served at all.
#[inline(always)]
fn origin(ctx: &SockAddrContext) -> Option<Origin> {
    // SAFETY: load-time constants, read as the kernel set them.
    let (host, pods) =
        unsafe { (core::ptr::read_volatile(&HOST_NETNS_COOKIE), core::ptr::read_volatile(&SOCKET_LB_PODS)) };
    // SAFETY: the context of this call.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if host != 0 && netns == host {
        Some(Origin::Host)
    } else if pods != 0 {
        Some(Origin::Pod)
    } else {
        None
    }
}

#[inline(always)]
fn fail(errno: i32) -> i32 {
    // SAFETY: plain helper; the call fails with -errno.
    unsafe { bpf_set_retval(-errno) };
    FAIL
}
