//! One body for every packet hook: parse, decide (`flow::process`), carry
//! the verdict out. What differs between XDP and a socket buffer (how to
//! rewrite, forward, answer, and the action codes) sits behind `Hook`.

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use lb_common::{Drop, Nat, config_flags};

use crate::{
    flow::{self, Verdict},
    frag, fwd,
    lb::Origin,
    maps::{self, count_drop, count_packet},
    nat,
    parse::{self, Fragment, Packet},
    reject,
};

/// Largest header span the TC program needs in the linear area: Ethernet
/// with a tag, IPv4 with options, a TCP header.
const TC_PULL_LEN: u32 = 18 + 60 + 20;

pub trait Hook: EbpfContext {
    type Action: Copy;
    const PASS: Self::Action;
    const DROP: Self::Action;
    /// For log lines.
    const NAME: &'static str;
    /// The hook forwards translated packets itself, around the host stack.
    const REDIRECTS: bool;

    fn packet(&self) -> Option<Packet>;
    /// Rewrites the packet in place as `nat` says.
    fn rewrite(&self, pkt: &Packet, nat: &Nat) -> bool;
    /// Rewrites a later fragment's addresses as `nat` says.
    fn rewrite_fragment(&self, pkt: &Packet, nat: &Nat) -> bool;
    /// Where a translated packet goes next.
    fn forward(&self, pkt: &Packet, nat: &Nat) -> Self::Action;
    /// Turns the packet into an ICMP port unreachable back to its sender;
    /// `None` if it could not be built.
    fn reject(&self, pkt: &Packet) -> Option<Self::Action>;
}

#[inline(always)]
pub fn run<H: Hook>(ctx: &H, origin: Origin) -> H::Action {
    let Some(pkt) = ctx.packet() else {
        return H::PASS;
    };
    let k = &pkt.key;
    if pkt.fragment == Fragment::Later {
        return later_fragment(ctx, &pkt, true);
    }
    let verdict = flow::process(&pkt, origin, H::REDIRECTS);
    if pkt.fragment == Fragment::First && !matches!(verdict, Verdict::Translate(_)) {
        frag::forget(&pkt);
    }
    match verdict {
        Verdict::Pass => H::PASS,
        Verdict::Drop(reason) => {
            count_drop(reason);
            debug!(
                ctx,
                "{} drop (reason {}): {:i}:{} -> {:i}:{}",
                H::NAME,
                reason as u32,
                k.saddr,
                k.sport,
                k.daddr,
                k.dport
            );
            H::DROP
        }
        Verdict::Reject(reason) => match ctx.reject(&pkt) {
            Some(action) => {
                count_drop(reason);
                debug!(
                    ctx,
                    "{} reject (reason {}): {:i}:{} -> {:i}:{}",
                    H::NAME,
                    reason as u32,
                    k.saddr,
                    k.sport,
                    k.daddr,
                    k.dport
                );
                action
            }
            None => {
                count_drop(Drop::RejectFailed);
                H::DROP
            }
        },
        Verdict::Translate(nat) => carry_out(ctx, &pkt, &nat, ctx.rewrite(&pkt, &nat)),
    }
}

/// Egress: replies of endpoints on the node's own addresses, rewritten and
/// sent on out of this interface (the stack chose it: nothing to forward).
#[inline(always)]
pub fn run_host_replies<H: Hook>(ctx: &H) -> H::Action {
    if maps::config().is_none_or(|c| c.flags & config_flags::HOST_ENDPOINTS == 0) {
        return H::PASS;
    }
    let Some(pkt) = ctx.packet() else {
        return H::PASS;
    };
    match pkt.fragment {
        Fragment::Later => later_fragment(ctx, &pkt, false),
        fragment => match flow::host_reply(&pkt) {
            Verdict::Translate(nat) => sent_on::<H>(ctx.rewrite(&pkt, &nat)),
            _ => {
                if fragment == Fragment::First {
                    frag::forget(&pkt);
                }
                H::PASS
            }
        },
    }
}

/// A fragment after the first gets the rewrite its datagram's first got,
/// if it got one, and goes where it went (`forward`), or on out of this
/// interface (egress).
// Its own BPF function: a stack frame apart from the new-flow path's.
#[inline(never)]
fn later_fragment<H: Hook>(ctx: &H, pkt: &Packet, forward: bool) -> H::Action {
    let Some(first) = frag::translation(pkt) else {
        return H::PASS;
    };
    count_packet(first.frontend_id, pkt.ip_len as u32, false);
    let nat = first.nat();
    let rewritten = ctx.rewrite_fragment(pkt, &nat);
    if forward { carry_out(ctx, pkt, &nat, rewritten) } else { sent_on::<H>(rewritten) }
}

/// At egress: a rewritten packet continues out of its interface.
#[inline(always)]
fn sent_on<H: Hook>(rewritten: bool) -> H::Action {
    if rewritten {
        H::PASS
    } else {
        count_drop(Drop::RewriteFailed);
        H::DROP
    }
}

/// Forwards a translated packet, or drops it if the rewrite failed.
#[inline(always)]
fn carry_out<H: Hook>(ctx: &H, pkt: &Packet, nat: &Nat, rewritten: bool) -> H::Action {
    if rewritten {
        ctx.forward(pkt, nat)
    } else {
        count_drop(Drop::RewriteFailed);
        H::DROP
    }
}

impl Hook for XdpContext {
    type Action = u32;
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;
    const NAME: &'static str = "xdp";
    // XDP_TX is forwarding too, but only for SNAT flows, whose replies
    // come back to this hook: no flow needs marking.
    const REDIRECTS: bool = false;

    #[inline(always)]
    fn packet(&self) -> Option<Packet> {
        let (data, data_end) = (self.data(), self.data_end());
        parse::parse(data, data_end, data_end - data)
    }

    #[inline(always)]
    fn rewrite(&self, pkt: &Packet, nat: &Nat) -> bool {
        nat::rewrite_xdp(self.data(), self.data_end(), pkt, nat).is_some()
    }

    #[inline(always)]
    fn rewrite_fragment(&self, pkt: &Packet, nat: &Nat) -> bool {
        nat::ip_header_xdp(self.data(), self.data_end(), pkt, nat).is_some()
    }

    #[inline(always)]
    fn forward(&self, pkt: &Packet, nat: &Nat) -> u32 {
        fwd::xdp(self, pkt, nat)
    }

    #[inline(always)]
    fn reject(&self, pkt: &Packet) -> Option<u32> {
        reject::xdp(self, pkt)
    }
}

impl Hook for TcContext {
    type Action = i32;
    const PASS: i32 = TC_ACT_OK;
    const DROP: i32 = TC_ACT_SHOT;
    const NAME: &'static str = "tc";
    const REDIRECTS: bool = true;

    #[inline(always)]
    fn packet(&self) -> Option<Packet> {
        let want = TC_PULL_LEN.min(self.len());
        if ((self.data_end() - self.data()) as u32) < want {
            // Headers may sit outside the linear area: pull them in first.
            let _ = self.pull_data(want);
        }
        parse::parse(self.data(), self.data_end(), self.len() as usize)
    }

    #[inline(always)]
    fn rewrite(&self, pkt: &Packet, nat: &Nat) -> bool {
        nat::rewrite_tc(self, pkt, nat).is_ok()
    }

    #[inline(always)]
    fn rewrite_fragment(&self, pkt: &Packet, nat: &Nat) -> bool {
        nat::ip_header_tc(self, pkt, nat).is_ok()
    }

    /// Flows from outside are redirected (both ways); pods' own traffic
    /// continues into the stack, which routes it.
    #[inline(always)]
    fn forward(&self, pkt: &Packet, nat: &Nat) -> i32 {
        fwd::tc(self, pkt, nat)
    }

    #[inline(always)]
    fn reject(&self, pkt: &Packet) -> Option<i32> {
        reject::tc(self, pkt)
    }
}
