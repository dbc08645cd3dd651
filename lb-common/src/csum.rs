//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! All 16-bit values are big-endian words as they appear on the wire: read a
//! checksum field with `u16::from_be_bytes` and write the result back with
//! `to_be_bytes`.

/// Folds a 32-bit one's complement accumulator into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624, eqn. 3: the checksum after one 16-bit word changed from `old`
/// to `new`, `HC' = ~(~HC + ~m + m')`.
#[inline(always)]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    !fold(!check as u32 + !old as u32 + new as u32)
}

/// The checksum after a 4-byte field (an IPv4 address) changed.
#[inline(always)]
pub const fn replace32(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let sum = !check as u32
        + !u16::from_be_bytes([old[0], old[1]]) as u32
        + !u16::from_be_bytes([old[2], old[3]]) as u32
        + u16::from_be_bytes([new[0], new[1]]) as u32
        + u16::from_be_bytes([new[2], new[3]]) as u32;
    !fold(sum)
}

/// A UDP checksum of 0 means "not computed" and must stay 0; a computed 0
/// is sent as 0xffff (RFC 768).
#[inline(always)]
pub const fn udp_adjust(original: u16, updated: u16) -> u16 {
    if original == 0 {
        0
    } else if updated == 0 {
        0xffff
    } else {
        updated
    }
}

/// The one's complement sum of `data` as big-endian words (odd length padded
/// with a zero byte), not yet folded or inverted.
pub const fn sum(data: &[u8]) -> u32 {
    let mut acc: u32 = 0;
    let mut i = 0;
    while i + 1 < data.len() {
        acc += u16::from_be_bytes([data[i], data[i + 1]]) as u32;
        // Fold as we go so long inputs cannot overflow.
        acc = (acc & 0xffff) + (acc >> 16);
        i += 2;
    }
    if i < data.len() {
        acc += (data[i] as u32) << 8;
    }
    acc
}

/// The Internet checksum of `data` (with its checksum field zeroed).
pub const fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A 20-byte IPv4 header from RFC 1071-style worked examples.
    const HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0,
        0xa8, 0x00, 0xc7,
    ];

    fn with_checksum(mut hdr: [u8; 20]) -> [u8; 20] {
        hdr[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(&hdr);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        hdr
    }

    /// One's complement has two zeros: 0x0000 and 0xffff are the same sum.
    fn same(a: u16, b: u16) -> bool {
        a == b || (a == 0 && b == 0xffff) || (a == 0xffff && b == 0)
    }

    #[test]
    fn known_ipv4_header_checksum() {
        let hdr = with_checksum(HDR);
        assert_eq!(u16::from_be_bytes([hdr[10], hdr[11]]), 0xb861);
        // A correct header sums to all ones.
        assert_eq!(fold(sum(&hdr)), 0xffff);
    }

    #[test]
    fn odd_length_is_zero_padded() {
        assert_eq!(sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_adjust(0, 0x1234), 0);
        assert_eq!(udp_adjust(0x1111, 0), 0xffff);
        assert_eq!(udp_adjust(0x1111, 0x2222), 0x2222);
    }

    proptest! {
        /// Rewriting an address with replace32 gives the checksum a full
        /// recomputation gives.
        #[test]
        fn replace32_matches_recompute(hdr in any::<[u8; 20]>(), new in any::<[u8; 4]>(), dst in any::<bool>()) {
            let hdr = with_checksum(hdr);
            let off = if dst { 16 } else { 12 };
            let old: [u8; 4] = hdr[off..off + 4].try_into().unwrap();
            let check = u16::from_be_bytes([hdr[10], hdr[11]]);
            let mut rewritten = hdr;
            rewritten[off..off + 4].copy_from_slice(&new);
            let expected = with_checksum(rewritten);
            let incremental = replace32(check, old, new);
            prop_assert!(same(incremental, u16::from_be_bytes([expected[10], expected[11]])));
            rewritten[10..12].copy_from_slice(&incremental.to_be_bytes());
            prop_assert_eq!(fold(sum(&rewritten)), 0xffff);
        }

        /// Rewriting a port (a 16-bit word) anywhere in a segment.
        #[test]
        fn replace16_matches_recompute(mut seg in proptest::collection::vec(any::<u8>(), 8..64), word in 0usize..4, new in any::<u16>()) {
            // Bytes 6..8 hold the checksum (as in UDP); ports sit in words 0 and 1.
            let w = [0usize, 2, 0, 2][word];
            seg[6] = 0;
            seg[7] = 0;
            let c = checksum(&seg);
            seg[6..8].copy_from_slice(&c.to_be_bytes());
            let old = u16::from_be_bytes([seg[w], seg[w + 1]]);
            seg[w..w + 2].copy_from_slice(&new.to_be_bytes());
            let incremental = replace16(c, old, new);
            seg[6..8].copy_from_slice(&incremental.to_be_bytes());
            prop_assert_eq!(fold(sum(&seg)), 0xffff);
        }

        /// A chain of updates (DNAT then SNAT: two addresses, two ports) stays valid.
        #[test]
        fn chained_updates_stay_valid(mut seg in proptest::collection::vec(any::<u8>(), 20..80),
                                      saddr in any::<[u8; 4]>(), daddr in any::<[u8; 4]>(),
                                      sport in any::<u16>(), dport in any::<u16>()) {
            // TCP-like layout: ports at 0 and 2, checksum at 16; the pseudo
            // header's addresses are held outside the segment.
            let mut src = [10, 0, 0, 1];
            let mut dst = [10, 96, 0, 10];
            let full = |seg: &[u8], s: [u8; 4], d: [u8; 4]| {
                let mut acc = sum(seg) + sum(&s) + sum(&d) + 6 + seg.len() as u32;
                acc = (acc & 0xffff) + (acc >> 16);
                fold(acc)
            };
            seg[16] = 0;
            seg[17] = 0;
            let c = !full(&seg, src, dst);
            seg[16..18].copy_from_slice(&c.to_be_bytes());

            let mut check = c;
            check = replace32(check, dst, daddr);
            dst = daddr;
            check = replace32(check, src, saddr);
            src = saddr;
            let old_sport = u16::from_be_bytes([seg[0], seg[1]]);
            check = replace16(check, old_sport, sport);
            seg[0..2].copy_from_slice(&sport.to_be_bytes());
            let old_dport = u16::from_be_bytes([seg[2], seg[3]]);
            check = replace16(check, old_dport, dport);
            seg[2..4].copy_from_slice(&dport.to_be_bytes());
            seg[16..18].copy_from_slice(&check.to_be_bytes());
            prop_assert_eq!(full(&seg, src, dst), 0xffff);
        }
    }
}
