//! IPv4 fragments. Only a datagram's first fragment has the transport
//! header, so only it can be looked up by 5-tuple; its translation is kept
//! by what all the datagram's fragments share (addresses, IP id, protocol),
//! and the later fragments get the same addresses and go the same way.
//! A later fragment that arrives before its first (reordered on the way) is
//! not known yet and is passed untranslated, as is any fragment not of a
//! service flow. A first fragment left untranslated forgets what an earlier
//! datagram with the same id got, and a rewrite older than the kernel's
//! reassembly timeout is not used: an IP id comes round again.

use lb_common::{FragEntry, FragKey, Nat};

use crate::{conntrack, maps, parse::Packet};

#[inline(always)]
fn key(pkt: &Packet) -> FragKey {
    FragKey { saddr: pkt.key.saddr, daddr: pkt.key.daddr, id: pkt.ip_id, proto: pkt.key.proto, _pad: 0 }
}

// Both their own BPF functions: the keys get stack frames apart from the
// packet path's, whose frames the new-flow path adds to.

/// Remembers how a first fragment was translated.
#[inline(never)]
pub fn remember(pkt: &Packet, nat: &Nat, frontend_id: u32) {
    maps::set_fragment(&key(pkt), &FragEntry::new(nat, frontend_id, conntrack::now()));
}

/// A first fragment that is not translated: its later fragments are not
/// either, whatever an earlier datagram with its id got.
#[inline(never)]
pub fn forget(pkt: &Packet) {
    maps::forget_fragment(&key(pkt));
}

/// How a later fragment's datagram was translated, if it was.
#[inline(never)]
pub fn translation(pkt: &Packet) -> Option<FragEntry> {
    maps::fragment(&key(pkt)).filter(|f| f.live(conntrack::now()))
}
