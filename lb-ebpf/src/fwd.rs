//! Forwarding after translation, around the host stack where the hook can:
//! the FIB says where the translated packet goes, and the program sends it
//! there itself. At XDP that is XDP_TX back out of the ingress interface
//! (source-NATed flows to remote backends and their replies); everything
//! else goes up the stack. At TC a marked flow (`ct_flags::BYPASS`) is
//! redirected: into a local pod (`bpf_redirect_peer`), or out of any
//! interface (`bpf_redirect`, or `bpf_redirect_neigh` while the neighbour
//! is unresolved).
//!
//! The FIB's answers are cached per CPU for `ct_timeout::NEXT_HOP`
//! (`lb_next_hops`), keyed by destination and ingress interface: this
//! assumes destination-based routing (a source or TOS routing policy would
//! see a shared answer for up to that long).

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        __sk_buff, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup,
        bpf_redir_neigh, xdp_action,
    },
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::{TcContext, XdpContext},
};
use lb_common::{Nat, NextHop, csum, ct_flags, ct_timeout, next_hop_flags, next_hop_slot};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    conntrack, maps,
    parse::{Packet, ptr_at},
};

const AF_INET: u8 = 2;
const ETH_HLEN: usize = 14;
/// Offset of the TTL in the IPv4 header; the protocol follows it.
const IP_TTL_OFF: usize = 8;
const IP_CHECK_OFF: usize = 10;

/// Where a translated packet goes next.
enum Route {
    /// A resolved next hop.
    Hop(NextHop),
    /// Out of `oif` toward `nh`, whose link address is not known yet.
    Neigh { oif: u32, nh: u32 },
    /// Local, unreachable, too big, or otherwise the stack's business.
    Stack,
}

/// The translated packet's destination and source.
#[inline(always)]
fn addresses(pkt: &Packet, nat: &Nat) -> ([u8; 4], [u8; 4]) {
    let daddr = if nat.flags & ct_flags::REWRITE_DST != 0 { nat.daddr } else { pkt.key.daddr };
    let saddr = if nat.flags & ct_flags::REWRITE_SRC != 0 { nat.saddr } else { pkt.key.saddr };
    (daddr, saddr)
}

/// The next hop toward the translated destination for a packet from
/// `ingress`: the cached answer while it holds, else the FIB's (cached
/// when resolved). `SKB`: the FIB checks the MTU against the socket buffer
/// itself (GSO included); else against the IP length.
// Its own BPF function: the lookup's structure gets a stack frame apart
// from the caller's (and at most five arguments, the result's pointer
// included).
#[inline(never)]
fn route<C: EbpfContext, const SKB: bool>(ctx: &C, pkt: &Packet, nat: &Nat, ingress: u32) -> Route {
    let tot_len = if SKB { 0 } else { pkt.ip_len };
    let (daddr, saddr) = addresses(pkt, nat);
    let Some(cache) = maps::next_hop(next_hop_slot(daddr)) else { return Route::Stack };
    let now = conntrack::now();
    if cache.answers(ingress, daddr, now) {
        return Route::Hop(*cache);
    }
    // SAFETY: the fib struct is plain data; the helper gets our own context.
    let (rc, fib) = unsafe {
        let mut fib: bpf_fib_lookup = zeroed();
        fib.family = AF_INET;
        fib.l4_protocol = pkt.key.proto;
        fib.__bindgen_anon_1.tot_len = tot_len;
        fib.ifindex = ingress;
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(saddr);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(daddr);
        let rc = fib_lookup(ctx.as_ptr(), &mut fib as *mut _, size_of::<bpf_fib_lookup>() as i32, 0);
        (rc, fib)
    };
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // SAFETY: the lookup filled in the next hop's address.
        return Route::Neigh { oif: fib.ifindex, nh: unsafe { fib.__bindgen_anon_4.ipv4_dst } };
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Route::Stack;
    }
    // SAFETY: the lookup succeeded, so the MAC arm of the union is set.
    let macs = unsafe { fib.__bindgen_anon_6.__bindgen_anon_2 };
    *cache = NextHop {
        ingress,
        daddr,
        dmac: macs.dmac,
        smac: macs.smac,
        oif: fib.ifindex,
        flags: if maps::is_pod_if(fib.ifindex) { next_hop_flags::PEER } else { 0 },
        until: now + ct_timeout::NEXT_HOP,
    };
    Route::Hop(*cache)
}

/// XDP: a source-NATed packet whose next hop is back out of the interface
/// it came in on is sent there (XDP_TX); anything else goes up the stack.
#[inline(never)]
pub fn xdp(ctx: &XdpContext, pkt: &Packet, nat: &Nat) -> u32 {
    if nat.flags & ct_flags::SNAT == 0 || pkt.l2_len() != ETH_HLEN {
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
    let hop = match route::<_, false>(ctx, pkt, nat, ingress) {
        Route::Hop(hop) if hop.oif == ingress => hop,
        _ => return xdp_action::XDP_PASS,
    };
    // Read afresh: the verifier forgets packet bounds across helper calls.
    // (No tag here, so the IPv4 header follows the Ethernet one at once.)
    let (Some(eth), Some(ip)) = (
        ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0),
        ptr_at::<Ipv4Hdr>(ctx.data(), ctx.data_end(), ETH_HLEN),
    ) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds-checked pointers. Forwarding as a router: one hop less.
    unsafe {
        (*eth).dst_addr = hop.dmac;
        (*eth).src_addr = hop.smac;
        let old = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
        (*ip).ttl -= 1;
        let new = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
        (*ip).check = csum::replace16(u16::from_be_bytes((*ip).check), old, new).to_be_bytes();
    }
    xdp_action::XDP_TX
}

/// TC: a flow marked to bypass the stack is redirected to its next hop;
/// others (and anything the FIB leaves to the stack) continue into it.
#[inline(never)]
pub fn tc(ctx: &TcContext, pkt: &Packet, nat: &Nat) -> i32 {
    if nat.flags & ct_flags::BYPASS == 0 || pkt.l2_len() != ETH_HLEN {
        return TC_ACT_OK;
    }
    let Ok(ttl_proto) = ctx.load::<[u8; 2]>(pkt.l3() + IP_TTL_OFF) else { return TC_ACT_OK };
    if ttl_proto[0] <= 1 {
        return TC_ACT_OK;
    }
    // SAFETY: the context is a socket buffer.
    let ingress = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ingress_ifindex };
    let route = route::<_, true>(ctx, pkt, nat, ingress);
    if matches!(route, Route::Stack) {
        return TC_ACT_OK;
    }
    // One hop less, as the stack's forwarding would.
    let new = [ttl_proto[0] - 1, ttl_proto[1]];
    let (old16, new16) = (u16::from_ne_bytes(ttl_proto) as u64, u16::from_ne_bytes(new) as u64);
    if ctx.l3_csum_replace(pkt.l3() + IP_CHECK_OFF, old16, new16, 2).is_err()
        || ctx.store(pkt.l3() + IP_TTL_OFF, &new, 0).is_err()
    {
        return TC_ACT_OK;
    }
    // SAFETY (below): helpers taking plain values and our own parameters.
    match route {
        Route::Hop(hop) => {
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&hop.dmac);
            macs[6..].copy_from_slice(&hop.smac);
            if ctx.store(0, &macs, 0).is_err() {
                return TC_ACT_OK;
            }
            let rc = if hop.flags & next_hop_flags::PEER != 0 {
                unsafe { bpf_redirect_peer(hop.oif, 0) }
            } else {
                unsafe { bpf_redirect(hop.oif, 0) }
            };
            rc as i32
        }
        Route::Neigh { oif, nh } => {
            let mut params = bpf_redir_neigh { nh_family: AF_INET as u32, ..unsafe { zeroed() } };
            params.__bindgen_anon_1.ipv4_nh = nh;
            unsafe {
                bpf_redirect_neigh(oif, &mut params as *mut _, size_of::<bpf_redir_neigh>() as i32, 0) as i32
            }
        }
        Route::Stack => TC_ACT_OK,
    }
}
