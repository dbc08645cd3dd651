//! Connection tracking. Each flow has two entries in `lb_conntrack`: one keyed
//! by the request's 5-tuple, one by the reply's, each saying how to rewrite
//! the packets of its direction. Entries expire lazily: a lookup ignores an
//! entry idle for longer than its protocol's timeout, and the LRU reclaims it.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::bpf_ktime_get_coarse_ns,
};
use lb_common::{CtEntry, CtKey, Event, ct_flags, ct_tcp, ct_timeout};

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
    // A SYN (or SYN-ACK) on a closed flow is a new connection reusing its
    // ports: through a frontend again (it is opened anew), or straight to
    // the backend's address (a socket hook translated it at connect(), or
    // the client dialled the pod), whose packets this entry must not
    // rewrite any more.
    if tcp_flags & ct_tcp::SYN != 0 && entry.closing() {
        maps::conntrack_delete(key);
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

/// How a flow whose tuple is wanted again may have ended for it to be
/// taken back.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// Expired, reset, or its other entry gone: nothing of it is left at
    /// either end.
    Gone,
    /// Also closed with a FIN each way, though its last ACK may still be on
    /// its way and the server's socket still closing (netfilter keeps such
    /// a tuple for two minutes): a last resort for a NAT port.
    Closed,
}

/// Inserts `entry` under `key` if no live flow holds it: a free key, or one
/// whose flow is `over` (taken back). How a reply tuple, and so a NAT port,
/// is claimed; it never overwrites a live flow's entry.
#[inline(always)]
pub fn claim(key: &CtKey, entry: &CtEntry, now: u64, over: Over) -> bool {
    if maps::conntrack_insert(key, entry, BPF_NOEXIST).is_ok() {
        return true;
    }
    if !ended(key, now, over) {
        return false;
    }
    maps::count_event(Event::NatReclaimed);
    maps::conntrack_insert(key, entry, BPF_ANY).is_ok()
}

/// Whether the flow holding `key` is `over`: an entry of it expired, a RST
/// was seen either way, or its other entry is gone (evicted); with
/// `Over::Closed`, also a FIN each way. A flow's two entries see the
/// packets of their own direction.
#[inline(always)]
fn ended(key: &CtKey, now: u64, over: Over) -> bool {
    let Some(e) = maps::conntrack_peek(key) else { return true };
    if e.expired(key.proto, now) || e.tcp & ct_tcp::RST != 0 {
        return true;
    }
    // The other direction's entry: the tuple as its packets carry it,
    // from this one's key and rewrite.
    let mut other = key.reversed();
    if e.flags & ct_flags::REWRITE_SRC != 0 {
        (other.daddr, other.dport) = (e.nat_saddr, e.nat_sport);
    }
    if e.flags & ct_flags::REWRITE_DST != 0 {
        (other.saddr, other.sport) = (e.nat_daddr, e.nat_dport);
    }
    let Some(o) = maps::conntrack_peek(&other) else { return true };
    o.expired(key.proto, now)
        || o.tcp & ct_tcp::RST != 0
        || (over == Over::Closed && e.tcp & o.tcp & ct_tcp::FIN != 0)
}
