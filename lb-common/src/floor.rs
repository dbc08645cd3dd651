//! What the benchmark's reference programs (the `lb-floor` object) share
//! with the harness that drives them.
//!
//! Live-frames test runs recycle their pages with whatever the programs and
//! the stack wrote into them: the frame is *not* copied afresh from the
//! input each time. So the generator writes every frame from a template,
//! and the sink that receives a measured program's XDP_TX frames writes the
//! template back before the page returns to the pool.

/// Longest template frame.
pub const TEMPLATE_LEN: usize = 64;

/// `floor_template[0]`: the frame a live-frames run must start from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Template {
    /// Bytes of `bytes` in use (0: no template).
    pub len: u32,
    pub _pad: u32,
    pub bytes: [u8; TEMPLATE_LEN],
}

impl Template {
    /// A template of `frame` (at most `TEMPLATE_LEN` bytes).
    pub fn new(frame: &[u8]) -> Option<Self> {
        let mut bytes = [0; TEMPLATE_LEN];
        bytes.get_mut(..frame.len())?.copy_from_slice(frame);
        Some(Self { len: frame.len() as u32, _pad: 0, bytes })
    }
}

/// `gen_config[0]`: which flows the generator sends. Its template frame
/// (`floor_template`) is addressed to `vip_base` from port `GEN_PORT_BASE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenConfig {
    /// First service address; service `i` is `vip_base + i`.
    pub vip_base: [u8; 4],
    /// How many consecutive service addresses the frames go to.
    pub services: u32,
    /// Distinct flows, cycled through; 0 makes every frame a new flow.
    pub flows: u32,
    pub _pad: u32,
}

/// Lowest source port the generator stamps.
pub const GEN_PORT_BASE: u16 = 1024;
const GEN_PORTS: u32 = 65_536 - GEN_PORT_BASE as u32;

/// Frame number `counter`'s service index and source port. Consecutive
/// flows go to consecutive services, then the source port moves on, so
/// every service sees flows and no 5-tuple repeats within
/// `services × 64,512` flows.
#[inline(always)]
pub fn gen_flow(counter: u32, cfg: &GenConfig) -> (u32, u16) {
    let services = if cfg.services == 0 { 1 } else { cfg.services };
    let flow = if cfg.flows == 0 { counter } else { counter % cfg.flows };
    let port = GEN_PORT_BASE as u32 + (flow / services) % GEN_PORTS;
    (flow % services, port as u16)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, every bit pattern valid.
    unsafe impl aya::Pod for super::GenConfig {}
    unsafe impl aya::Pod for super::Template {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_flow_per_frame_spreads_over_services_then_ports() {
        let cfg = GenConfig { vip_base: [10, 96, 0, 0], services: 3, flows: 0, _pad: 0 };
        let seen: [(u32, u16); 4] = core::array::from_fn(|c| gen_flow(c as u32, &cfg));
        assert_eq!(seen, [(0, 1024), (1, 1024), (2, 1024), (0, 1025)]);
    }

    #[test]
    fn bounded_flows_repeat() {
        let cfg = GenConfig { vip_base: [10, 96, 0, 0], services: 100, flows: 150, _pad: 0 };
        assert_eq!(gen_flow(7, &cfg), gen_flow(157, &cfg));
        assert_eq!(gen_flow(120, &cfg), (20, 1025));
    }

    #[test]
    fn ports_wrap_above_the_reserved_range() {
        let cfg = GenConfig { vip_base: [0; 4], services: 1, flows: 0, _pad: 0 };
        assert_eq!(gen_flow(GEN_PORTS - 1, &cfg).1, 65_535);
        assert_eq!(gen_flow(GEN_PORTS, &cfg).1, GEN_PORT_BASE);
    }
}
