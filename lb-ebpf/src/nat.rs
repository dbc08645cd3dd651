//! Address and port rewriting with checksum updates.
//!
//! XDP sees frames as they came off the wire, with complete checksums: it
//! writes the bytes directly and updates checksums incrementally (RFC 1624,
//! `lb_common::csum`). TC sees socket buffers whose L4 checksum may still be
//! partial (offloaded), so it uses the kernel's csum helpers, which handle
//! both cases. The IP header is rewritten on its own first (`ip_header_*`):
//! all a later fragment needs, whose datagram's transport checksum was
//! updated in the first fragment. SCTP's CRC32c leaves out the addresses
//! and is patched for the ports (`lb_common::crc32c`).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    programs::TcContext,
};
use lb_common::{L4, Nat, crc32c, csum, ct_flags};
use network_types::ip::Ipv4Hdr;

use crate::parse::{Packet, ptr_at};

const IP_CHECK_OFF: usize = 10;
const IP_SADDR_OFF: usize = 12;
const IP_DADDR_OFF: usize = 16;
const SCTP_CRC_OFF: usize = 8;

/// The SCTP packet's length, which its CRC runs over.
#[inline(always)]
fn sctp_len(pkt: &Packet) -> u16 {
    pkt.ip_len - (pkt.l4() - pkt.l3()) as u16
}

/// `ports` (source, destination, as in the transport header) after `e`.
#[inline(always)]
fn new_ports(ports: [u8; 4], e: &Nat) -> [u8; 4] {
    let mut out = ports;
    if e.flags & ct_flags::REWRITE_SRC != 0 {
        out[..2].copy_from_slice(&e.sport.to_be_bytes());
    }
    if e.flags & ct_flags::REWRITE_DST != 0 {
        out[2..].copy_from_slice(&e.dport.to_be_bytes());
    }
    out
}

/// The CRC after the ports changed. A zero CRC is one the sender left to
/// offload (Linux does so toward veths and NICs with SCTP CRC offload): it
/// is computed later, over the rewritten packet, and stays zero.
#[inline(always)]
fn sctp_crc(crc: [u8; 4], old: [u8; 4], new: [u8; 4], pkt: &Packet) -> [u8; 4] {
    if crc == [0; 4] || old == new {
        return crc;
    }
    crc32c::replace_head(u32::from_le_bytes(crc), old, new, sctp_len(pkt)).to_le_bytes()
}

/// Where the transport's Internet checksum is (TCP, UDP; SCTP has its own
/// way above).
#[inline(always)]
fn l4_check_off(pkt: &Packet) -> Option<usize> {
    Some(pkt.l4() + pkt.proto.csum_offset()?)
}

/// Rewrites the frame in `data..data_end` as `e` says.
#[inline(always)]
pub fn rewrite_xdp(data: usize, data_end: usize, pkt: &Packet, e: &Nat) -> Option<()> {
    if pkt.proto == L4::Sctp {
        return sctp_xdp(data, data_end, pkt, e);
    }
    ip_header_xdp(data, data_end, pkt, e)?;
    let ports: *mut [u8; 4] = ptr_at(data, data_end, pkt.l4())?;
    let check: *mut [u8; 2] = ptr_at(data, data_end, l4_check_off(pkt)?)?;
    // SAFETY: both pointers were bounds-checked above.
    unsafe {
        let l4_orig = u16::from_be_bytes(*check);
        let mut l4 = l4_orig;
        // Addresses are part of the L4 pseudo header.
        if e.flags & ct_flags::REWRITE_SRC != 0 {
            l4 = csum::replace32(l4, pkt.key.saddr, e.saddr);
            l4 = csum::replace16(l4, pkt.key.sport, e.sport);
            (&mut *ports)[0..2].copy_from_slice(&e.sport.to_be_bytes());
        }
        if e.flags & ct_flags::REWRITE_DST != 0 {
            l4 = csum::replace32(l4, pkt.key.daddr, e.daddr);
            l4 = csum::replace16(l4, pkt.key.dport, e.dport);
            (&mut *ports)[2..4].copy_from_slice(&e.dport.to_be_bytes());
        }
        if pkt.proto.zero_csum_means_none() {
            l4 = csum::udp_adjust(l4_orig, l4);
        }
        *check = l4.to_be_bytes();
    }
    Some(())
}

// Its own BPF function, as is the TC one: the CRC arithmetic stays out of
// the packet path's stack frame.
#[inline(never)]
fn sctp_xdp(data: usize, data_end: usize, pkt: &Packet, e: &Nat) -> Option<()> {
    ip_header_xdp(data, data_end, pkt, e)?;
    let ports: *mut [u8; 4] = ptr_at(data, data_end, pkt.l4())?;
    let crc: *mut [u8; 4] = ptr_at(data, data_end, pkt.l4() + SCTP_CRC_OFF)?;
    // SAFETY: both bounds-checked above.
    unsafe {
        let old = *ports;
        let new = new_ports(old, e);
        *crc = sctp_crc(*crc, old, new, pkt);
        *ports = new;
    }
    Some(())
}

#[inline(never)]
fn sctp_tc(ctx: &TcContext, pkt: &Packet, e: &Nat) -> Result<(), i64> {
    ip_header_tc(ctx, pkt, e)?;
    let old: [u8; 4] = ctx.load(pkt.l4())?;
    let new = new_ports(old, e);
    if new != old {
        // (RECOMPUTE_CSUM keeps a CHECKSUM_COMPLETE buffer's sum right.)
        let crc: [u8; 4] = ctx.load(pkt.l4() + SCTP_CRC_OFF)?;
        let flags = BPF_F_RECOMPUTE_CSUM as u64;
        ctx.store(pkt.l4() + SCTP_CRC_OFF, &sctp_crc(crc, old, new, pkt), flags)?;
        ctx.store(pkt.l4(), &new, flags)?;
    }
    Ok(())
}

/// Rewrites the socket buffer as `e` says, through the csum helpers.
#[inline(always)]
pub fn rewrite_tc(ctx: &TcContext, pkt: &Packet, e: &Nat) -> Result<(), i64> {
    if pkt.proto == L4::Sctp {
        return sctp_tc(ctx, pkt, e);
    }
    let check = l4_check_off(pkt).ok_or(-1i64)?;
    // MARK_MANGLED_0 keeps a zero (absent) checksum zero, and writes a
    // computed zero as 0xffff.
    let l4_flags = if pkt.proto.zero_csum_means_none() { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    if e.flags & ct_flags::REWRITE_SRC != 0 {
        set_addr(ctx, pkt, pkt.l3() + IP_SADDR_OFF, check, l4_flags, pkt.key.saddr, e.saddr)?;
        set_port(ctx, pkt.l4(), check, l4_flags, pkt.key.sport, e.sport)?;
    }
    if e.flags & ct_flags::REWRITE_DST != 0 {
        set_addr(ctx, pkt, pkt.l3() + IP_DADDR_OFF, check, l4_flags, pkt.key.daddr, e.daddr)?;
        set_port(ctx, pkt.l4() + 2, check, l4_flags, pkt.key.dport, e.dport)?;
    }
    Ok(())
}

#[inline(always)]
fn set_addr(
    ctx: &TcContext,
    pkt: &Packet,
    off: usize,
    check: usize,
    l4_flags: u64,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    let (from, to) = (u32::from_ne_bytes(old) as u64, u32::from_ne_bytes(new) as u64);
    // Addresses are part of the L4 pseudo header.
    ctx.l4_csum_replace(check, from, to, l4_flags | BPF_F_PSEUDO_HDR as u64 | 4)?;
    set_ip_addr(ctx, pkt, off, old, new)
}

/// Rewrites the addresses in the IP header of the frame in
/// `data..data_end`, and its checksum: the whole rewrite of a later
/// fragment (`Fragment::Later`).
#[inline(always)]
pub fn ip_header_xdp(data: usize, data_end: usize, pkt: &Packet, e: &Nat) -> Option<()> {
    let ip: *mut Ipv4Hdr = ptr_at(data, data_end, pkt.l3())?;
    // SAFETY: bounds-checked above.
    unsafe {
        let mut l3 = u16::from_be_bytes((*ip).check);
        if e.flags & ct_flags::REWRITE_SRC != 0 {
            l3 = csum::replace32(l3, pkt.key.saddr, e.saddr);
            (*ip).src_addr = e.saddr;
        }
        if e.flags & ct_flags::REWRITE_DST != 0 {
            l3 = csum::replace32(l3, pkt.key.daddr, e.daddr);
            (*ip).dst_addr = e.daddr;
        }
        (*ip).check = l3.to_be_bytes();
    }
    Some(())
}

/// The same for a socket buffer.
#[inline(always)]
pub fn ip_header_tc(ctx: &TcContext, pkt: &Packet, e: &Nat) -> Result<(), i64> {
    if e.flags & ct_flags::REWRITE_SRC != 0 {
        set_ip_addr(ctx, pkt, pkt.l3() + IP_SADDR_OFF, pkt.key.saddr, e.saddr)?;
    }
    if e.flags & ct_flags::REWRITE_DST != 0 {
        set_ip_addr(ctx, pkt, pkt.l3() + IP_DADDR_OFF, pkt.key.daddr, e.daddr)?;
    }
    Ok(())
}

/// An address in the IP header only.
#[inline(always)]
fn set_ip_addr(ctx: &TcContext, pkt: &Packet, off: usize, old: [u8; 4], new: [u8; 4]) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    let (from, to) = (u32::from_ne_bytes(old) as u64, u32::from_ne_bytes(new) as u64);
    ctx.l3_csum_replace(pkt.l3() + IP_CHECK_OFF, from, to, 4)?;
    ctx.store(off, &new, 0)
}

#[inline(always)]
fn set_port(ctx: &TcContext, off: usize, check: usize, l4_flags: u64, old: u16, new: u16) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    let (from, to) = (old.to_be() as u64, new.to_be() as u64);
    ctx.l4_csum_replace(check, from, to, l4_flags | 2)?;
    ctx.store(off, &new.to_be_bytes(), 0)
}
