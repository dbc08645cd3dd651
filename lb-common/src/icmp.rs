//! ICMP "port unreachable", the answer kube-proxy's REJECT gives for a
//! service without endpoints. Built here as plain bytes so both kernel hooks
//! share it and the host can test it.

use crate::csum;

pub const IPV4_HDR_LEN: usize = 20;
/// ICMP header (8) plus the offending packet's IPv4 header and first 8 bytes
/// of its transport header, as RFC 792 asks.
pub const ICMP_LEN: usize = 8 + IPV4_HDR_LEN + 8;
/// The reply's IPv4 packet: header plus ICMP message.
pub const REPLY_LEN: usize = IPV4_HDR_LEN + ICMP_LEN;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;

/// Writes into `out` the IPv4 packet answering `orig_ip` (an option-less IPv4
/// header) with ICMP port unreachable, from the address the client dialed.
#[inline(always)]
pub fn port_unreachable(orig_ip: &[u8; IPV4_HDR_LEN], orig_l4: &[u8; 8], out: &mut [u8; REPLY_LEN]) {
    let (ip, icmp) = out.split_at_mut(IPV4_HDR_LEN);
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&(REPLY_LEN as u16).to_be_bytes());
    ip[4..8].copy_from_slice(&[0, 0, 0, 0]); // id, no fragmentation
    ip[8] = 64; // ttl
    ip[9] = crate::IPPROTO_ICMP;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&orig_ip[16..20]); // from the service address
    ip[16..20].copy_from_slice(&orig_ip[12..16]); // to the client
    let ip_check = csum::checksum(ip);
    ip[10..12].copy_from_slice(&ip_check.to_be_bytes());

    icmp[0] = ICMP_DEST_UNREACH;
    icmp[1] = ICMP_PORT_UNREACH;
    icmp[2..8].copy_from_slice(&[0; 6]);
    icmp[8..8 + IPV4_HDR_LEN].copy_from_slice(orig_ip);
    icmp[8 + IPV4_HDR_LEN..].copy_from_slice(orig_l4);
    let icmp_check = csum::checksum(icmp);
    icmp[2..4].copy_from_slice(&icmp_check.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_is_addressed_back_and_checksummed() {
        let mut orig = [0u8; 20];
        orig[0] = 0x45;
        orig[9] = crate::IPPROTO_TCP;
        orig[12..16].copy_from_slice(&[10, 244, 1, 5]);
        orig[16..20].copy_from_slice(&[10, 96, 0, 10]);
        let l4 = [0x9c, 0x40, 0x00, 0x50, 1, 2, 3, 4];
        let mut out = [0u8; REPLY_LEN];
        port_unreachable(&orig, &l4, &mut out);

        assert_eq!(&out[12..16], &[10, 96, 0, 10]);
        assert_eq!(&out[16..20], &[10, 244, 1, 5]);
        assert_eq!(u16::from_be_bytes([out[2], out[3]]) as usize, REPLY_LEN);
        assert_eq!(csum::fold(csum::sum(&out[..20])), 0xffff);
        assert_eq!(csum::fold(csum::sum(&out[20..])), 0xffff);
        assert_eq!((out[20], out[21]), (3, 3));
        assert_eq!(&out[28..48], &orig);
        assert_eq!(&out[48..56], &l4);
    }
}
