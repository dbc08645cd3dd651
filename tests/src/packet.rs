//! Test frames in, checked frames out. Frames are built and parsed with
//! etherparse, independently of the dataplane's own parser and checksum code.

use std::net::Ipv4Addr;

use etherparse::{
    Icmpv4Header, Icmpv4Type, NetSlice, PacketBuilder, SlicedPacket, TransportSlice,
    icmpv4::DestUnreachableHeader,
};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

pub type Addr = ([u8; 4], u16);

/// A TCP segment from `src` to `dst` with the given flags ("S", "A", "F", "R" combined).
pub fn tcp(src: Addr, dst: Addr, flags: &str, payload: &[u8]) -> Vec<u8> {
    let mut b =
        PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv4(src.0, dst.0, 64).tcp(src.1, dst.1, 1000, 64240);
    for f in flags.chars() {
        b = match f {
            'S' => b.syn(),
            'A' => b.ack(1),
            'F' => b.fin(),
            'R' => b.rst(),
            'P' => b.psh(),
            'U' => b.urg(0),
            other => panic!("unknown TCP flag {other}"),
        };
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build tcp");
    out
}

pub fn udp(src: Addr, dst: Addr, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.0, dst.0, 64)
        .udp(src.1, dst.1)
        .write(&mut out, payload)
        .expect("build udp");
    out
}

/// A UDP datagram sent without a checksum (checksum field 0).
pub fn udp_no_checksum(src: Addr, dst: Addr, payload: &[u8]) -> Vec<u8> {
    let mut out = udp(src, dst, payload);
    out[14 + 20 + 6] = 0;
    out[14 + 20 + 7] = 0;
    out
}

/// `frame` with one 802.1Q tag (VLAN 100) after the MAC addresses.
pub fn with_vlan(frame: &[u8]) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(&[0x81, 0x00, 0x00, 100]);
    out.extend_from_slice(&frame[12..]);
    out
}

/// What a test asserts about a frame, read by etherparse.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: Addr,
    pub dst: Addr,
    pub proto: u8,
    pub ttl: u8,
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    /// L4 checksum as on the wire (0 for UDP without checksum).
    pub l4_checksum: u16,
}

/// Parses an IPv4 TCP/UDP frame and asserts both checksums are correct.
pub fn parse_checked(frame: &[u8]) -> Seen {
    let p = SlicedPacket::from_ethernet(frame).expect("frame parses");
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = p.link.clone() else { panic!("no ethernet header") };
    let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!("not IPv4: {:?}", p.net) };
    let iph = ip.header().to_header();
    assert_eq!(iph.header_checksum, iph.calc_header_checksum(), "IPv4 header checksum");
    let (sport, dport, l4_checksum) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let expected = t.to_header().calc_checksum_ipv4(&iph, t.payload()).expect("tcp checksum");
            assert_eq!(t.checksum(), expected, "TCP checksum");
            (t.source_port(), t.destination_port(), t.checksum())
        }
        Some(TransportSlice::Udp(u)) => {
            if u.checksum() != 0 {
                let expected = u.to_header().calc_checksum_ipv4(&iph, u.payload()).expect("udp checksum");
                assert_eq!(u.checksum(), expected, "UDP checksum");
            }
            (u.source_port(), u.destination_port(), u.checksum())
        }
        other => panic!("not TCP/UDP: {other:?}"),
    };
    Seen {
        src: (iph.source, sport),
        dst: (iph.destination, dport),
        proto: iph.protocol.0,
        ttl: iph.time_to_live,
        eth_src: eth.source(),
        eth_dst: eth.destination(),
        l4_checksum,
    }
}

/// An ICMP port unreachable, checked: its addresses and the quoted packet's 5-tuple.
#[derive(Debug, PartialEq, Eq)]
pub struct Unreachable {
    pub from: Ipv4Addr,
    pub to: Ipv4Addr,
    pub quoted_src: Addr,
    pub quoted_dst: Addr,
    pub eth_dst: [u8; 6],
}

pub fn parse_port_unreachable(frame: &[u8]) -> Unreachable {
    let p = SlicedPacket::from_ethernet(frame).expect("frame parses");
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = p.link.clone() else { panic!("no ethernet header") };
    let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!("not IPv4") };
    let iph = ip.header().to_header();
    assert_eq!(iph.header_checksum, iph.calc_header_checksum(), "IPv4 header checksum");
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else { panic!("not ICMP: {:?}", p.transport) };
    assert_eq!(
        icmp.icmp_type(),
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        "ICMP type/code"
    );
    let recomputed = Icmpv4Header::with_checksum(icmp.icmp_type(), icmp.payload());
    assert_eq!(icmp.checksum(), recomputed.checksum, "ICMP checksum");
    // The quote is the IPv4 header plus 8 bytes: parse the header alone.
    let q = icmp.payload();
    let qh = etherparse::Ipv4HeaderSlice::from_slice(q).expect("quoted IPv4 header").to_header();
    let ihl = qh.header_len();
    let ports = (u16::from_be_bytes([q[ihl], q[ihl + 1]]), u16::from_be_bytes([q[ihl + 2], q[ihl + 3]]));
    Unreachable {
        from: Ipv4Addr::from(iph.source),
        to: Ipv4Addr::from(iph.destination),
        quoted_src: (qh.source, ports.0),
        quoted_dst: (qh.destination, ports.1),
        eth_dst: eth.destination(),
    }
}

/// `frame` (Ethernet, then IPv4 without options) cut into IPv4 fragments
/// with identification `id`, each carrying at most `chunk` bytes of the IP
/// payload (a multiple of 8), as a sender's stack does for a datagram
/// larger than its MTU.
pub fn fragments(frame: &[u8], id: u16, chunk: usize) -> Vec<Vec<u8>> {
    assert!(chunk.is_multiple_of(8) && chunk > 0, "fragment payloads are multiples of 8");
    let (head, payload) = frame.split_at(14 + 20);
    let parts: Vec<&[u8]> = payload.chunks(chunk).collect();
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let mut out = head.to_vec();
            out.extend_from_slice(part);
            let more = if i + 1 < parts.len() { 0x2000 } else { 0 };
            let frags = more | ((i * chunk / 8) as u16);
            out[14 + 2..14 + 4].copy_from_slice(&((20 + part.len()) as u16).to_be_bytes());
            out[14 + 4..14 + 6].copy_from_slice(&id.to_be_bytes());
            out[14 + 6..14 + 8].copy_from_slice(&frags.to_be_bytes());
            set_ip_checksum(&mut out);
            out
        })
        .collect()
}

/// Fragments (in order, each a frame) put back into one frame under the
/// first one's headers, with every fragment's IP header checked and the
/// fragments asserted to agree on addresses, id and protocol: what the
/// receiver's reassembly would hand up.
pub fn reassemble(frames: &[Vec<u8>]) -> Vec<u8> {
    let header = |f: &[u8]| {
        let h = etherparse::Ipv4HeaderSlice::from_slice(&f[14..]).expect("IPv4 header").to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum(), "fragment's IPv4 header checksum");
        h
    };
    let first = header(&frames[0]);
    let mut out = frames[0][..14 + 20].to_vec();
    for f in frames {
        let h = header(f);
        assert_eq!(
            (h.source, h.destination, h.identification, h.protocol),
            (first.source, first.destination, first.identification, first.protocol),
            "fragments of one datagram"
        );
        assert_eq!(
            h.fragment_offset.byte_offset() as usize,
            out.len() - 14 - 20,
            "fragments in order, no gap"
        );
        out.extend_from_slice(&f[14 + 20..14 + h.total_len as usize]);
    }
    let total = (out.len() - 14) as u16;
    out[14 + 2..14 + 4].copy_from_slice(&total.to_be_bytes());
    out[14 + 6..14 + 8].copy_from_slice(&[0, 0]);
    set_ip_checksum(&mut out);
    out
}

fn set_ip_checksum(frame: &mut [u8]) {
    frame[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let h = etherparse::Ipv4HeaderSlice::from_slice(&frame[14..]).expect("IPv4 header").to_header();
    frame[14 + 10..14 + 12].copy_from_slice(&h.calc_header_checksum().to_be_bytes());
}

/// CRC32c, SCTP's checksum, from the `crc` crate: independent of the
/// dataplane's patching.
pub const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// An SCTP packet (common header, then one chunk of `chunk_type` carrying
/// `payload`), its CRC32c computed, or left 0 as a sender offloading it
/// does (`offloaded`).
pub fn sctp_packet(sport: u16, dport: u16, chunk_type: u8, payload: &[u8], offloaded: bool) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // verification tag
    p.extend_from_slice(&[0; 4]);
    p.push(chunk_type);
    p.push(0);
    p.extend_from_slice(&((4 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(payload);
    while p.len() % 4 != 0 {
        p.push(0);
    }
    if !offloaded {
        let crc = CRC32C.checksum(&p);
        p[8..12].copy_from_slice(&crc.to_le_bytes());
    }
    p
}

/// An SCTP packet from `src` to `dst` in an Ethernet frame.
pub fn sctp(src: Addr, dst: Addr, chunk_type: u8, payload: &[u8], offloaded: bool) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.0, dst.0, 64)
        .write(
            &mut out,
            etherparse::IpNumber::SCTP,
            &sctp_packet(src.1, dst.1, chunk_type, payload, offloaded),
        )
        .expect("build sctp");
    out
}

/// An SCTP frame's addresses and ports, with its IP checksum asserted and
/// whether its CRC32c is right (`None`: left 0 for offload).
pub fn parse_sctp(frame: &[u8]) -> (Addr, Addr, Option<bool>) {
    let h = etherparse::Ipv4HeaderSlice::from_slice(&frame[14..]).expect("IPv4 header").to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 header checksum");
    assert_eq!(h.protocol, etherparse::IpNumber::SCTP);
    let mut s = frame[14 + h.header_len()..14 + h.total_len as usize].to_vec();
    let port = |i: usize| u16::from_be_bytes([s[i], s[i + 1]]);
    let (sport, dport) = (port(0), port(2));
    let crc = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    s[8..12].copy_from_slice(&[0; 4]);
    let crc_ok = (crc != 0).then(|| crc == CRC32C.checksum(&s));
    ((h.source, sport), (h.destination, dport), crc_ok)
}
