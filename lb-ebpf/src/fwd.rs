//! Forwarding after translation at XDP. Source-NATed flows (external client,
//! remote backend) are routed straight back out of the interface they came
//! in on when the FIB says so; everything else goes up the stack, which
//! delivers to local pods.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::generated::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use lb_common::{Nat, csum, ct_flags};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::parse::{Packet, ptr_at};

const AF_INET: u8 = 2;

#[inline(never)]
pub fn xdp(ctx: &XdpContext, pkt: &Packet, e: &Nat) -> u32 {
    if e.flags & ct_flags::SNAT == 0 || pkt.l2_len() != 14 {
        return xdp_action::XDP_PASS;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, data_end, pkt.l3()) else {
        return xdp_action::XDP_PASS;
    };
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: bounds-checked pointers; the fib struct is plain data.
    unsafe {
        if (*ip).ttl <= 1 {
            // Let the stack send time-exceeded.
            return xdp_action::XDP_PASS;
        }
        let mut fib: bpf_fib_lookup = zeroed();
        fib.family = AF_INET;
        fib.l4_protocol = pkt.key.proto;
        fib.__bindgen_anon_1.tot_len = pkt.ip_len;
        fib.ifindex = ingress;
        fib.__bindgen_anon_2.tos = (*ip).tos;
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src_addr);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes((*ip).dst_addr);
        let rc = fib_lookup(ctx.as_ptr(), &mut fib as *mut _, size_of::<bpf_fib_lookup>() as i32, 0);
        if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 || fib.ifindex != ingress {
            return xdp_action::XDP_PASS;
        }
        // Forwarding as a router: one hop less.
        let old = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
        (*ip).ttl -= 1;
        let new = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
        (*ip).check = csum::replace16(u16::from_be_bytes((*ip).check), old, new).to_be_bytes();
        let macs = fib.__bindgen_anon_6.__bindgen_anon_2;
        let Some(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) else {
            return xdp_action::XDP_PASS;
        };
        (*eth).dst_addr = macs.dmac;
        (*eth).src_addr = macs.smac;
    }
    xdp_action::XDP_TX
}
