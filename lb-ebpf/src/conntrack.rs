//! Connection tracking. Each flow has two entries in `lb_conntrack`: one keyed
//! by the request's 5-tuple, one by the reply's, each saying how to rewrite
//! the packets of its direction. Entries expire lazily: a lookup ignores an
//! entry idle for longer than its protocol's timeout, and the LRU reclaims it.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::bpf_ktime_get_coarse_ns,
};
use lb_common::{CtEntry, CtKey, ct_tcp, ct_timeout};

use crate::maps;

/// `CLOCK_MONOTONIC` in nanoseconds, at tick resolution (cheap).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The live entry for `key`, updated with this packet's TCP flags.
#[inline(always)]
pub fn lookup(key: &CtKey, tcp_flags: u8, now: u64) -> Option<CtEntry> {
    let entry = maps::conntrack_entry(key)?;
    if entry.expired(key.proto, now) {
        return None;
    }
    // A SYN on a closed flow is a new connection reusing the same ports.
    if tcp_flags & ct_tcp::SYN != 0 && entry.closing() {
        return None;
    }
    let seen = entry.tcp | tcp_flags;
    if seen != entry.tcp || now.saturating_sub(entry.last_seen) > ct_timeout::REFRESH {
        entry.tcp = seen;
        entry.last_seen = now;
    }
    Some(*entry)
}

#[inline(always)]
pub fn insert(key: &CtKey, entry: &CtEntry) -> Result<(), i32> {
    maps::conntrack_insert(key, entry, BPF_ANY)
}

/// Inserts only if `key` is free: used to claim a SNAT port atomically.
#[inline(always)]
pub fn claim(key: &CtKey, entry: &CtEntry) -> bool {
    maps::conntrack_insert(key, entry, BPF_NOEXIST).is_ok()
}
