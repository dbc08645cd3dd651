//! Source-NAT port claims: a flow source-NATed to this node needs a source
//! port on the SNAT address that no other flow toward the same backend
//! uses, since the reply tuple is how its replies are found again.

use aya_ebpf::helpers::generated::bpf_get_prandom_u32;
use lb_common::{Config, CtEntry, CtKey};

use crate::conntrack;

/// How many random SNAT ports a new flow tries before giving up.
const TRIES: u32 = 16;

/// Claims a free port on `cfg.snat_addr` for a reply toward it: inserts
/// `reply` under `reply_key` with that destination, and returns the port.
#[inline(always)]
pub fn claim_port(reply_key: &mut CtKey, reply: &CtEntry, cfg: &Config) -> Option<u16> {
    reply_key.daddr = cfg.snat_addr;
    let range = cfg.nat_port_max.saturating_sub(cfg.nat_port_min) as u32 + 1;
    // SAFETY: helper without arguments.
    let start = unsafe { bpf_get_prandom_u32() };
    for i in 0..TRIES {
        let port = cfg.nat_port_min + (start.wrapping_add(i) % range) as u16;
        reply_key.dport = port;
        if conntrack::claim(reply_key, reply) {
            return Some(port);
        }
    }
    None
}
