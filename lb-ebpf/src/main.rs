//! The service load balancer's kernel programs.
//!
//! - `lb_xdp`: XDP on the node's external interfaces (north-south).
//! - `lb_tc_pod`: TC ingress on the host side of pod interfaces, i.e. packets
//!   leaving pods (east-west, and replies of local backends).
//!
//! Both read top to bottom the same way: parse, decide (`lb::process`), then
//! carry the verdict out with the hook's own means.
#![no_std]
#![no_main]
// The program macros generate entry points taking the raw context pointer.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod conntrack;
mod fwd;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use lb_common::Drop;

use crate::{
    lb::{Hook, Verdict},
    maps::count_drop,
};

/// Largest header span the TC program needs in the linear area: Ethernet
/// with a tag, IPv4 with options, a TCP header.
const TC_PULL_LEN: u32 = 18 + 60 + 20;

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(pkt) = parse::parse(data, data_end, data_end - data) else {
        return xdp_action::XDP_PASS;
    };
    match lb::process(&pkt, Hook::External) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop(reason) => {
            count_drop(reason);
            let k = &pkt.key;
            debug!(
                &ctx,
                "xdp drop (reason {}): {:i}:{} -> {:i}:{}", reason as u32, k.saddr, k.sport, k.daddr, k.dport
            );
            xdp_action::XDP_DROP
        }
        Verdict::Reject => {
            count_drop(Drop::Rejected);
            let k = &pkt.key;
            debug!(&ctx, "xdp reject, no endpoint: {:i}:{} -> {:i}:{}", k.saddr, k.sport, k.daddr, k.dport);
            reject::xdp(&ctx, &pkt)
        }
        Verdict::Translate(nat) => {
            if nat::rewrite_xdp(data, data_end, &pkt, &nat).is_none() {
                count_drop(Drop::RewriteFailed);
                return xdp_action::XDP_DROP;
            }
            fwd::xdp(&ctx, &pkt, &nat)
        }
    }
}

#[classifier]
pub fn lb_tc_pod(ctx: TcContext) -> i32 {
    let want = TC_PULL_LEN.min(ctx.len());
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        // Headers may sit outside the linear area: pull them in first.
        let _ = ctx.pull_data(want);
    }
    let Some(pkt) = parse::parse(ctx.data(), ctx.data_end(), ctx.len() as usize) else {
        return TC_ACT_OK;
    };
    match lb::process(&pkt, Hook::Pod) {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop(reason) => {
            count_drop(reason);
            let k = &pkt.key;
            debug!(
                &ctx,
                "tc drop (reason {}): {:i}:{} -> {:i}:{}", reason as u32, k.saddr, k.sport, k.daddr, k.dport
            );
            TC_ACT_SHOT
        }
        Verdict::Reject => {
            count_drop(Drop::Rejected);
            let k = &pkt.key;
            debug!(&ctx, "tc reject, no endpoint: {:i}:{} -> {:i}:{}", k.saddr, k.sport, k.daddr, k.dport);
            reject::tc(&ctx, &pkt)
        }
        Verdict::Translate(nat) => match nat::rewrite_tc(&ctx, &pkt, &nat) {
            Ok(()) => TC_ACT_OK,
            Err(_) => {
                count_drop(Drop::RewriteFailed);
                TC_ACT_SHOT
            }
        },
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
