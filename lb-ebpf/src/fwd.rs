//! Forwarding after translation at XDP. Source-NATed flows (external client,
//! remote backend) are routed straight back out of the interface they came
//! in on when the FIB says so; everything else goes up the stack, which
//! delivers to local pods. The FIB's answers are cached per CPU for
//! `ct_timeout::NEXT_HOP` (`lb_next_hops`), keyed by destination and
//! interface: this assumes destination-based routing on the external
//! interfaces (a source or TOS routing policy would see a shared answer for
//! up to that long).

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::generated::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use lb_common::{Nat, NextHop, csum, ct_flags, ct_timeout, next_hop_slot};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    conntrack, maps,
    parse::{Packet, ptr_at},
};

const AF_INET: u8 = 2;

#[inline(never)]
pub fn xdp(ctx: &XdpContext, pkt: &Packet, e: &Nat) -> u32 {
    if e.flags & ct_flags::SNAT == 0 || pkt.l2_len() != 14 {
        return xdp_action::XDP_PASS;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx.data(), ctx.data_end(), pkt.l3()) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: a bounds-checked pointer.
    if unsafe { (*ip).ttl } <= 1 {
        // Let the stack send time-exceeded.
        return xdp_action::XDP_PASS;
    }
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: as above.
    let daddr = unsafe { (*ip).dst_addr };
    let Some(hop) = maps::next_hop(next_hop_slot(daddr)) else {
        return xdp_action::XDP_PASS;
    };
    if hop.answers(ingress, daddr, conntrack::now()) {
        let Some(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: a bounds-checked pointer.
        unsafe {
            (*eth).dst_addr = hop.dmac;
            (*eth).src_addr = hop.smac;
        }
    } else if !route(ctx, pkt, ingress, daddr, hop) {
        return xdp_action::XDP_PASS;
    }
    // Read afresh: the verifier forgets packet bounds across helper calls.
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx.data(), ctx.data_end(), pkt.l3()) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: a bounds-checked pointer. Forwarding as a router: one hop less.
    unsafe {
        let old = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
        (*ip).ttl -= 1;
        let new = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
        (*ip).check = csum::replace16(u16::from_be_bytes((*ip).check), old, new).to_be_bytes();
    }
    xdp_action::XDP_TX
}

/// Asks the FIB where the rewritten packet goes; if out of `ingress`,
/// writes the next hop's addresses into it, keeps the answer in `cache` and
/// returns true. Its own BPF function: the lookup's structure gets a stack
/// frame apart from the caller's.
#[inline(never)]
fn route(ctx: &XdpContext, pkt: &Packet, ingress: u32, daddr: [u8; 4], cache: &mut NextHop) -> bool {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx.data(), ctx.data_end(), pkt.l3()) else {
        return false;
    };
    // SAFETY: a bounds-checked pointer; the fib struct is plain data.
    let (rc, fib) = unsafe {
        let mut fib: bpf_fib_lookup = zeroed();
        fib.family = AF_INET;
        fib.l4_protocol = pkt.key.proto;
        fib.__bindgen_anon_1.tot_len = pkt.ip_len;
        fib.ifindex = ingress;
        fib.__bindgen_anon_2.tos = (*ip).tos;
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src_addr);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(daddr);
        let rc = fib_lookup(ctx.as_ptr(), &mut fib as *mut _, size_of::<bpf_fib_lookup>() as i32, 0);
        (rc, fib)
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 || fib.ifindex != ingress {
        return false;
    }
    // SAFETY: the lookup succeeded, so the MAC arm of the union is set.
    let macs = unsafe { fib.__bindgen_anon_6.__bindgen_anon_2 };
    let Some(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) else {
        return false;
    };
    // SAFETY: a bounds-checked pointer.
    unsafe {
        (*eth).dst_addr = macs.dmac;
        (*eth).src_addr = macs.smac;
    }
    *cache = NextHop {
        ifindex: ingress,
        daddr,
        dmac: macs.dmac,
        smac: macs.smac,
        _pad: 0,
        until: conntrack::now() + ct_timeout::NEXT_HOP,
    };
    true
}
