//! Reference XDP programs for the test topology and the benchmarks; the
//! agent never loads them.
//!
//! - `floor_pass`: XDP_PASS. On the receiving end of a veth it makes XDP_TX
//!   frames deliverable without GRO, which would merge forwarded segments.
//! - `floor_tx`: parse Ethernet/IPv4/TCP, swap MACs, XDP_TX: the
//!   per-packet floor the load balancer is compared with.
//! - `floor_drop`: XDP_DROP, a sink that counts what it receives.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::PerCpuArray,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr};

#[btf_map(name = "floor_count")]
static COUNT: PerCpuArray<u64, 1> = PerCpuArray::new();

#[xdp]
pub fn floor_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn floor_drop(_ctx: XdpContext) -> u32 {
    if let Some(c) = COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    xdp_action::XDP_DROP
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
