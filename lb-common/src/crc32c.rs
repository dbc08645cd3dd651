//! SCTP's checksum, CRC32c (RFC 9260 appendix A), patched after a rewrite.
//!
//! The CRC covers the SCTP packet but not the IP addresses, so only a port
//! change touches it. CRC32c is linear over GF(2): for messages of equal
//! length, `crc(m ^ d) = crc(m) ^ raw(d)`, where `raw` runs the register
//! from 0 without the initial and final inversions. `d` is the ports' XOR
//! delta followed by zeros up to the packet's length, and running a register
//! through `k` zero bytes multiplies it by `x^(8k)` modulo the polynomial:
//! a handful of multiplications, rather than a pass over the packet, which
//! the kernel programs could not afford.
//!
//! Polynomials are in the CRC's reflected form: bit 31 is `x^0`.

/// The Castagnoli polynomial, reflected.
const POLY: u32 = 0x82f6_3b78;

/// `a · b mod POLY`.
#[inline(always)]
pub const fn mul(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut i = 0;
    while i < 32 {
        if a & (1 << (31 - i)) != 0 {
            product ^= b;
        }
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        i += 1;
    }
    product
}

/// `x^(2^k) mod POLY` for k = 0..32.
const X_POW_2K: [u32; 32] = {
    let mut table = [0; 32];
    table[0] = 1 << 30; // x^1
    let mut k = 1;
    while k < 32 {
        table[k] = mul(table[k - 1], table[k - 1]);
        k += 1;
    }
    table
};

/// `reg · x^(8n) mod POLY`: the register run through `n` zero bytes.
/// (The register, not a power of x, is what gets multiplied: in the kernel
/// programs it is an unknown value to the verifier, whose paths through
/// the branches below then merge, where known constants would not.)
#[inline(always)]
pub const fn shift_zeros(mut reg: u32, n: u16) -> u32 {
    let mut bit = 0;
    while bit < 16 {
        if n & (1 << bit) != 0 {
            // x^(8 · 2^bit) = x^(2^(bit + 3))
            reg = mul(X_POW_2K[bit + 3], reg);
        }
        bit += 1;
    }
    reg
}

/// The register after `bytes`, from 0 (no inversions).
#[inline(always)]
const fn raw(bytes: [u8; 4]) -> u32 {
    let mut reg = 0u32;
    let mut i = 0;
    while i < 4 {
        reg ^= bytes[i] as u32;
        let mut bit = 0;
        while bit < 8 {
            reg = if reg & 1 != 0 { (reg >> 1) ^ POLY } else { reg >> 1 };
            bit += 1;
        }
        i += 1;
    }
    reg
}

/// The CRC32c of a `len`-byte message (`len >= 4`) after its first four
/// bytes (an SCTP header's ports) changed from `old` to `new`.
#[inline(always)]
pub const fn replace_head(crc: u32, old: [u8; 4], new: [u8; 4], len: u16) -> u32 {
    let delta = [old[0] ^ new[0], old[1] ^ new[1], old[2] ^ new[2], old[3] ^ new[3]];
    crc ^ shift_zeros(raw(delta), len - 4)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

    #[test]
    fn the_check_value_and_the_zero_run() {
        // The catalogue's check value for "123456789".
        assert_eq!(CASTAGNOLI.checksum(b"123456789"), 0xe306_9283);
        assert_eq!(shift_zeros(0xdead_beef, 0), 0xdead_beef);
        assert_eq!(mul(1 << 31, 0xdead_beef), 0xdead_beef, "x^0 is the identity");
    }

    proptest! {
        /// Patching the CRC after a port change gives what computing it
        /// over the rewritten packet gives, at every length.
        #[test]
        fn a_patched_crc_is_the_rewritten_packets(
            mut packet in proptest::collection::vec(any::<u8>(), 12..3000),
            new_ports in any::<[u8; 4]>(),
        ) {
            // The checksum field (bytes 8..12) counts as zero.
            packet[8..12].copy_from_slice(&[0; 4]);
            let before = CASTAGNOLI.checksum(&packet);
            let old_ports = [packet[0], packet[1], packet[2], packet[3]];
            packet[..4].copy_from_slice(&new_ports);
            let after = CASTAGNOLI.checksum(&packet);
            prop_assert_eq!(replace_head(before, old_ports, new_ports, packet.len() as u16), after);
        }
    }
}
