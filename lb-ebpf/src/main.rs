//! The service load balancer's kernel programs.
//!
//! - `lb_tc_ext`: TC ingress on the node's external interfaces
//!   (north-south), the default: correct for every device and for partial
//!   checksums, and it forwards without the host stack.
//! - `lb_xdp`: the same at XDP, where a NIC gives complete frames.
//! - `lb_tc_pod`: TC ingress on the host side of pod interfaces, i.e. packets
//!   leaving pods (east-west, and replies of local backends).
//! - `lb_tc_egress`: TC egress of both kinds of interface: replies of
//!   endpoints on the node's own addresses (hostNetwork servers), which the
//!   host stack sends without passing an ingress hook.
//! - `lb_sock_*`: cgroup socket hooks for the node's own clients (and pods'
//!   with `--socket-lb all`): `sock` translates at connect()/sendmsg() and
//!   restores the service address at recvmsg()/getpeername().
//!
//! The packet programs are the same body (`hook::run`): parse, decide (`flow`: conntrack,
//! then `lb`'s frontend lookup and backend choice), carry the verdict out
//! with the hook's own means (`nat`, `fwd`, `reject`).
#![no_std]
#![no_main]
// The program macros generate entry points taking the raw context pointer.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod conntrack;
mod flow;
mod frag;
mod fwd;
mod hook;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod snat;
mod sock;

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, TC_ACT_OK},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

use crate::{
    lb::Origin,
    sock::{Call, Family},
};

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    hook::run(&ctx, Origin::External)
}

/// `skb->pkt_type` of frames addressed to this host.
const PACKET_HOST: u32 = 0;

#[classifier]
pub fn lb_tc_ext(ctx: TcContext) -> i32 {
    // A switch floods frames it has not learned yet: those for another
    // host's address are that host's to translate.
    // SAFETY: the context is a socket buffer.
    if unsafe { (*(ctx.as_ptr() as *const __sk_buff)).pkt_type } != PACKET_HOST {
        return TC_ACT_OK;
    }
    hook::run(&ctx, Origin::External)
}

#[classifier]
pub fn lb_tc_pod(ctx: TcContext) -> i32 {
    hook::run(&ctx, Origin::Pod)
}

#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    hook::run_host_replies(&ctx)
}

#[cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, Family::V4, Call::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, Family::V4, Call::SendMsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, Family::V4)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_peer4(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, Family::V4)
}

// Dual-stack sockets name IPv4 services as `::ffff:a.b.c.d`.
#[cgroup_sock_addr(connect6)]
pub fn lb_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, Family::V4InV6, Call::Connect)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, Family::V4InV6, Call::SendMsg)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, Family::V4InV6)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_sock_peer6(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, Family::V4InV6)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
