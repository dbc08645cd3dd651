//! ICMP port unreachable for a service without endpoints, turned around in
//! place: the frame is resized to the reply, rewritten, and sent back out of
//! the interface it came in on.

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, TC_ACT_REDIRECT, xdp_action},
    btf_maps::PerCpuArray,
    helpers::generated::{bpf_redirect, bpf_xdp_adjust_tail},
    macros::btf_map,
    programs::{TcContext, XdpContext},
};
use lb_common::icmp::{IPV4_HDR_LEN, REPLY_LEN, port_unreachable};

use crate::parse::{Packet, ptr_at};

/// The bytes the reply is made of, copied out before the frame changes.
/// Kept in a per-CPU map: the BPF stack is too small to hold it beside the
/// callers' frames.
#[repr(C)]
pub struct Quote {
    l2: [u8; 18],
    ip: [u8; IPV4_HDR_LEN],
    l4: [u8; 8],
    reply: [u8; REPLY_LEN],
}

#[btf_map(name = "lb_reject_buf")]
static SCRATCH: PerCpuArray<Quote, 1> = PerCpuArray::new();

/// Builds the reply from the original headers, which `read` copies into
/// `l2`, `ip` and `l4`.
#[inline(always)]
fn quote(pkt: &Packet, read: impl FnOnce(&mut Quote) -> Option<()>) -> Option<&'static Quote> {
    if !pkt.plain_ip {
        return None;
    }
    // SAFETY: per-CPU scratch, used by one program run at a time on this CPU.
    let q = unsafe { &mut *SCRATCH.get_ptr_mut(0)? };
    read(q)?;
    port_unreachable(&q.ip, &q.l4, &mut q.reply);
    // Back to the sender: swap the MAC addresses, keep tag and ethertype.
    for i in 0..6 {
        q.l2.swap(i, i + 6);
    }
    Some(q)
}

/// Turns the frame into the reply and sends it back out (XDP_TX); `None`
/// when it cannot be built (IP options, a helper failure).
#[inline(never)]
pub fn xdp(ctx: &XdpContext, pkt: &Packet) -> Option<u32> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let q = quote(pkt, |q| {
        // SAFETY: each read is bounds-checked by ptr_at.
        unsafe {
            q.l2[..14].copy_from_slice(&*ptr_at::<[u8; 14]>(data, data_end, 0)?);
            if pkt.l2_len() == 18 {
                q.l2[14..18].copy_from_slice(&*ptr_at::<[u8; 4]>(data, data_end, 14)?);
            }
            q.ip = *ptr_at(data, data_end, pkt.l3())?;
            q.l4 = *ptr_at(data, data_end, pkt.l4())?;
        }
        Some(())
    })?;
    let want = pkt.l2_len() + REPLY_LEN;
    let delta = want as i32 - (data_end - data) as i32;
    // SAFETY: the context pointer is the program's own.
    if unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, delta) } != 0 {
        return None;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if pkt.l2_len() == 18 {
        write_frame::<18>(data, data_end, q)?;
    } else {
        write_frame::<14>(data, data_end, q)?;
    }
    Some(xdp_action::XDP_TX)
}

#[inline(always)]
fn write_frame<const L2: usize>(data: usize, data_end: usize, q: &Quote) -> Option<()> {
    let l2: *mut [u8; L2] = ptr_at(data, data_end, 0)?;
    let reply: *mut [u8; REPLY_LEN] = ptr_at(data, data_end, L2)?;
    // SAFETY: both ranges were bounds-checked above.
    unsafe {
        (*l2).copy_from_slice(&q.l2[..L2]);
        *reply = q.reply;
    }
    Some(())
}

/// Turns the socket buffer into the reply and redirects it back out of
/// its device; `None` when it cannot be built.
#[inline(never)]
pub fn tc(ctx: &TcContext, pkt: &Packet) -> Option<i32> {
    let q = quote(pkt, |q| {
        // Fixed-size loads: the verifier rejects a length that could be 0.
        if pkt.l2_len() == 18 {
            q.l2 = ctx.load(0).ok()?;
        } else {
            q.l2[..14].copy_from_slice(&ctx.load::<[u8; 14]>(0).ok()?);
        }
        q.ip = ctx.load(pkt.l3()).ok()?;
        q.l4 = ctx.load(pkt.l4()).ok()?;
        Some(())
    })?;
    let want = (pkt.l2_len() + REPLY_LEN) as u32;
    let stored = ctx.change_tail(want, 0).and_then(|()| {
        if pkt.l2_len() == 18 {
            ctx.store(0, &q.l2, 0)?;
        } else {
            let mut l2 = [0u8; 14];
            l2.copy_from_slice(&q.l2[..14]);
            ctx.store(0, &l2, 0)?;
        }
        ctx.store(pkt.l2_len(), &q.reply, 0)
    });
    stored.ok()?;
    // SAFETY: the context is a socket buffer.
    let ifindex = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex };
    // Out of the same device: on a pod's host-side veth that delivers to the pod.
    (unsafe { bpf_redirect(ifindex, 0) } == TC_ACT_REDIRECT as i64).then_some(TC_ACT_REDIRECT)
}
