//! Reference XDP programs for the test topology and the benchmarks; the
//! agent never loads them.
//!
//! - `floor_pass`: XDP_PASS. On the receiving end of a veth it makes XDP_TX
//!   frames deliverable without GRO, which would merge forwarded segments.
//! - `floor_tx`: parse Ethernet/IPv4/TCP, swap MACs, XDP_TX: the
//!   per-packet floor the load balancer is compared with.
//! - `floor_drop`: XDP_DROP, a sink that counts what it receives.
//! - `floor_restore`: a sink for the peer of a live-frames run: writes
//!   `floor_template` back into the frame, counts and drops, so the recycled
//!   page starts the next run as the input frame (see `lb_common::floor`).
//! - `floor_gen`: a packet generator for live-frames test runs: it writes
//!   the template UDP frame, turns it into the next flow of `gen_config`
//!   (service address and source port, checksums updated) and sends it with
//!   XDP_TX.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::xdp_action,
    btf_maps::{Array, PerCpuArray},
    helpers::generated::bpf_xdp_store_bytes,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{
    csum,
    floor::{GenConfig, TEMPLATE_LEN, Template, gen_flow},
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

#[btf_map(name = "floor_count")]
static COUNT: PerCpuArray<u64, 1> = PerCpuArray::new();

#[btf_map(name = "floor_template")]
static TEMPLATE: Array<Template, 1> = Array::new();

#[btf_map(name = "gen_config")]
static GEN_CONFIG: Array<GenConfig, 1> = Array::new();

/// Frames generated so far. Shared, not per CPU: one thread drives the
/// generator, and its flow sequence must not restart when it migrates.
#[btf_map(name = "gen_counter")]
static GEN_COUNTER: Array<u32, 1> = Array::new();

#[xdp]
pub fn floor_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count_and_drop() -> u32 {
    if let Some(c) = COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    xdp_action::XDP_DROP
}

#[xdp]
pub fn floor_drop(_ctx: XdpContext) -> u32 {
    count_and_drop()
}

/// Writes the template over the start of the frame; false if there is none
/// or it does not fit.
#[inline(always)]
fn restore(ctx: &XdpContext) -> bool {
    let Some(t) = TEMPLATE.get(0) else { return false };
    let len = t.len as usize;
    if len == 0 || len > TEMPLATE_LEN {
        return false;
    }
    // SAFETY: the helper bounds-checks the frame; `len` fits the map value.
    let rc =
        unsafe { bpf_xdp_store_bytes(ctx.as_ptr() as *mut _, 0, t.bytes.as_ptr() as *mut _, len as u32) };
    rc == 0
}

#[xdp]
pub fn floor_restore(ctx: XdpContext) -> u32 {
    restore(&ctx);
    count_and_drop()
}

#[xdp]
pub fn floor_tx(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + size_of::<EthHdr>() + size_of::<Ipv4Hdr>() + size_of::<TcpHdr>() > end {
        return xdp_action::XDP_PASS;
    }
    let eth = data as *mut EthHdr;
    let ip = (data + size_of::<EthHdr>()) as *const Ipv4Hdr;
    // SAFETY: bounds checked above.
    unsafe {
        if (*eth).ether_type != 0x0008 || (*ip).proto != 6 || (*ip).vihl != 0x45 {
            return xdp_action::XDP_PASS;
        }
        core::mem::swap(&mut (*eth).src_addr, &mut (*eth).dst_addr);
    }
    xdp_action::XDP_TX
}

#[xdp]
pub fn floor_gen(ctx: XdpContext) -> u32 {
    if !restore(&ctx) {
        return xdp_action::XDP_ABORTED;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let l4 = data + size_of::<EthHdr>() + size_of::<Ipv4Hdr>();
    if l4 + size_of::<UdpHdr>() > end {
        return xdp_action::XDP_ABORTED;
    }
    let (Some(cfg), Some(counter)) = (GEN_CONFIG.get(0), GEN_COUNTER.get_ptr_mut(0)) else {
        return xdp_action::XDP_ABORTED;
    };
    let ip = (data + size_of::<EthHdr>()) as *mut Ipv4Hdr;
    let udp = l4 as *mut UdpHdr;
    // SAFETY: bounds checked above; the counter slot is a valid map value.
    unsafe {
        let n = *counter;
        *counter = n.wrapping_add(1);
        let (service, sport) = gen_flow(n, cfg);
        let dst = u32::from_be_bytes(cfg.vip_base).wrapping_add(service).to_be_bytes();
        let (old_dst, old_sport) = ((*ip).dst_addr, u16::from_be_bytes((*udp).src));
        (*ip).dst_addr = dst;
        (*ip).check = csum::replace32(u16::from_be_bytes((*ip).check), old_dst, dst).to_be_bytes();
        (*udp).src = sport.to_be_bytes();
        let check = u16::from_be_bytes((*udp).check);
        let updated = csum::replace16(csum::replace32(check, old_dst, dst), old_sport, sport);
        (*udp).check = csum::udp_adjust(check, updated).to_be_bytes();
    }
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
