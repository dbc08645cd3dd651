//! Source-port claims for NAT: a flow whose source is rewritten needs a
//! source port that no other live flow toward the same backend uses, since
//! the reply tuple is how its replies are found again. Ports are probed at
//! random (runs of taken ports do not defeat a claim, as they would a
//! linear probe); a port whose flow has ended or expired is taken back.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::{bpf_get_prandom_u32, bpf_loop};
use lb_common::{Config, CtEntry, CtKey};

use crate::conntrack::{self, Over};

/// Random ports a claim tries: with 90% of the range held by live flows it
/// fails with odds 0.9^256 ≈ 2e-12; with 99%, about one claim in 13. The
/// bound keeps a flood of new flows to an exhausted range cheap (a full
/// sweep would cost thousands of lookups per packet).
const TRIES: u32 = 256;

/// One claim in progress, shared with the loop's callback (pointers to
/// the caller's key and entry: the BPF stack is small).
#[repr(C)]
struct Claim {
    key: *mut CtKey,
    entry: *const CtEntry,
    now: u64,
    min: u16,
    range: u16,
    found: u32,
}

/// One try: a random port of the range, free or taken back from a flow that
/// is over; in the first half of the tries only from one that is gone, so
/// that a port whose connection has just closed with FINs is reused only
/// when the range is nearly full. Its own BPF function, run by `bpf_loop`:
/// the verifier checks it once rather than once per try.
#[inline(never)]
extern "C" fn probe(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `claim_port` passes its own `Claim`, alive for the loop, and
    // its pointers lead to the caller's key and entry.
    let c = unsafe { &mut *(ctx as *mut Claim) };
    let (key, entry) = unsafe { (&mut *c.key, &*c.entry) };
    // SAFETY: helper without arguments.
    let offset = unsafe { bpf_get_prandom_u32() } % (c.range as u32 + 1);
    key.dport = c.min.wrapping_add(offset as u16);
    let over = if index < TRIES as u64 / 2 { Over::Gone } else { Over::Closed };
    if conntrack::claim(key, entry, c.now, over) {
        c.found = 1;
        return 1;
    }
    0
}

/// Claims a port of `cfg`'s range on `addr` for a reply toward it: inserts
/// `reply` under `reply_key` with that destination; returns the port.
#[inline(always)]
pub fn claim_port(
    reply_key: &mut CtKey,
    reply: &CtEntry,
    addr: [u8; 4],
    cfg: &Config,
    now: u64,
) -> Option<u16> {
    reply_key.daddr = addr;
    let mut c = Claim {
        key: reply_key as *mut CtKey,
        entry: reply as *const CtEntry,
        now,
        min: cfg.nat_port_min,
        range: cfg.nat_port_max.saturating_sub(cfg.nat_port_min),
        found: 0,
    };
    // SAFETY: the callback is a BPF function of this program; the context
    // is our stack's, alive for the call.
    unsafe { bpf_loop(TRIES, probe as *mut c_void, &mut c as *mut Claim as *mut c_void, 0) };
    (c.found != 0).then_some(reply_key.dport)
}
