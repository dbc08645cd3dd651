//! Header parsing: Ethernet (with at most one 802.1Q/802.1ad tag), IPv4,
//! TCP, UDP and SCTP, whole or (TCP, UDP) in fragments. Anything else, and
//! packets too short or inconsistent to trust, yield `None` and are passed
//! untouched.

use core::mem::size_of;

use lb_common::{CtKey, L4, ct_tcp};
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const ETH_P_8021Q: [u8; 2] = [0x81, 0x00];
const ETH_P_8021AD: [u8; 2] = [0x88, 0xa8];
/// SCTP's common header, a chunk's header, and the chunk types that open
/// and end an association (RFC 9260).
const SCTP_HLEN: usize = 12;
const SCTP_CHUNK_HLEN: usize = 4;
const SCTP_INIT: u8 = 1;
const SCTP_ABORT: u8 = 6;
const SCTP_SHUTDOWN_COMPLETE: u8 = 14;

/// The more-fragments flag and the fragment offset of the IPv4 `frags` field.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// Which part of its datagram a packet is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    Whole,
    /// The first fragment: it has the transport header.
    First,
    /// A later fragment: no transport header, so no ports; it is
    /// translated as its datagram's first fragment was (`frag`).
    Later,
}

/// Where the headers of an IPv4 TCP, UDP or SCTP packet are, and its
/// 5-tuple (ports 0 for a later fragment, which has no transport header).
#[derive(Clone, Copy)]
pub struct Packet {
    /// Offset of the IPv4 header from the start of the frame.
    l3: u8,
    /// Offset of the TCP/UDP header.
    l4: u8,
    /// Length of the L2 header (14, or 18 with a VLAN tag).
    l2_len: u8,
    /// IPv4 total length: the bytes counted per service.
    pub ip_len: u16,
    /// The IPv4 header has no options (ICMP replies are built only then).
    pub plain_ip: bool,
    /// The 5-tuple; ports in host order.
    pub key: CtKey,
    /// The transport protocol of `key.proto`.
    pub proto: L4,
    /// SYN/FIN/RST as `ct_tcp` bits (0 for UDP; SCTP's INIT counts as a
    /// SYN, ABORT and SHUTDOWN COMPLETE as a RST).
    pub tcp_flags: u8,
    pub fragment: Fragment,
    /// The IPv4 identification field (network order): with the addresses
    /// and protocol, what a datagram's fragments have in common.
    pub ip_id: u16,
}

impl Packet {
    const EMPTY: Self = Self {
        l3: 0,
        l4: 0,
        l2_len: 0,
        ip_len: 0,
        plain_ip: false,
        key: CtKey::new([0; 4], [0; 4], 0, 0, 0),
        proto: L4::Tcp,
        tcp_flags: 0,
        fragment: Fragment::Whole,
        ip_id: 0,
    };

    #[inline(always)]
    pub fn l3(&self) -> usize {
        self.l3 as usize
    }
    #[inline(always)]
    pub fn l4(&self) -> usize {
        self.l4 as usize
    }
    #[inline(always)]
    pub fn l2_len(&self) -> usize {
        self.l2_len as usize
    }
}

/// A bounds-checked pointer to a `T` at `off` bytes into the packet.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, off: usize) -> Option<*mut T> {
    if data + off + size_of::<T>() > data_end {
        return None;
    }
    Some((data + off) as *mut T)
}

/// Parses the frame in `data..data_end`. `pkt_len` is the full packet length
/// (larger than `data_end - data` for a non-linear or GSO socket buffer); the
/// IPv4 total length must fit inside it.
#[inline(always)]
pub fn parse(data: usize, data_end: usize, pkt_len: usize) -> Option<Packet> {
    let mut pkt = Packet::EMPTY;
    parse_into(data, data_end, pkt_len, &mut pkt).then_some(pkt)
}

// Its own BPF function: its locals get a frame apart from the packet
// path's, which the new-flow path adds to (the verifier allows 512 bytes
// for the deepest chain of calls). It fills in `out` rather than return an
// `Option<Packet>`: the kernel refuses the BTF bpf-linker writes for that.
#[inline(never)]
fn parse_into(data: usize, data_end: usize, pkt_len: usize, out: &mut Packet) -> bool {
    match parse_inline(data, data_end, pkt_len) {
        Some(pkt) => {
            *out = pkt;
            true
        }
        None => false,
    }
}

#[inline(always)]
fn parse_inline(data: usize, data_end: usize, pkt_len: usize) -> Option<Packet> {
    let mut l2_len = ETH_HLEN;
    let mut ethertype: [u8; 2] = unsafe { *ptr_at(data, data_end, 12)? };
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = unsafe { *ptr_at(data, data_end, ETH_HLEN + 2)? };
        l2_len += VLAN_HLEN;
    }
    if ethertype != ETH_P_IP {
        return None;
    }

    let l3 = l2_len;
    let ip: *const Ipv4Hdr = ptr_at(data, data_end, l3)?;
    let (vihl, proto, frags, tot_len, saddr, daddr, ip_id) = unsafe {
        (
            (*ip).vihl,
            (*ip).proto,
            u16::from_be_bytes((*ip).frags),
            u16::from_be_bytes((*ip).tot_len),
            (*ip).src_addr,
            (*ip).dst_addr,
            u16::from_ne_bytes((*ip).id),
        )
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    if (tot_len as usize) < ihl || l3 + tot_len as usize > pkt_len {
        return None;
    }
    let l4 = l3 + ihl;
    let fragment = match (frags & IP_OFFSET, frags & IP_MF) {
        (0, 0) => Fragment::Whole,
        (0, _) => Fragment::First,
        _ => Fragment::Later,
    };

    let l4_proto = L4::from_proto(proto)?;
    let (sport, dport, tcp_flags, l4_min) = match l4_proto {
        // No transport header: nothing more to read.
        _ if fragment == Fragment::Later => (0, 0, 0, 0),
        L4::Tcp => {
            let tcp: *const TcpHdr = ptr_at(data, data_end, l4)?;
            let t = unsafe { &*tcp };
            let mut flags = 0;
            if t.syn() != 0 {
                flags |= ct_tcp::SYN;
            }
            if t.fin() != 0 {
                flags |= ct_tcp::FIN;
            }
            if t.rst() != 0 {
                flags |= ct_tcp::RST;
            }
            if t.doff() < 5 {
                return None;
            }
            (u16::from_be_bytes(t.source), u16::from_be_bytes(t.dest), flags, (t.doff() as usize) * 4)
        }
        L4::Udp => {
            let udp: *const UdpHdr = ptr_at(data, data_end, l4)?;
            let u = unsafe { &*udp };
            // The datagram's own length must fit the IP payload (padding
            // after it is allowed, as the stack trims it); a first
            // fragment holds only its start.
            let len = u16::from_be_bytes(u.len) as usize;
            let whole = fragment == Fragment::Whole;
            if len < size_of::<UdpHdr>() || (whole && ihl + len > tot_len as usize) {
                return None;
            }
            (u16::from_be_bytes(u.src), u16::from_be_bytes(u.dst), 0, size_of::<UdpHdr>())
        }
        L4::Sctp => {
            // Its CRC runs over the whole datagram, whose length a first
            // fragment does not tell: SCTP in fragments is not translated.
            if fragment == Fragment::First {
                return None;
            }
            let ports: [u8; 4] = unsafe { *ptr_at(data, data_end, l4)? };
            // The first chunk's type: a new association, or its end.
            let chunk: u8 = unsafe { *ptr_at(data, data_end, l4 + SCTP_HLEN)? };
            let flags = match chunk {
                SCTP_INIT => ct_tcp::SYN,
                SCTP_ABORT | SCTP_SHUTDOWN_COMPLETE => ct_tcp::RST,
                _ => 0,
            };
            let [s0, s1, d0, d1] = ports;
            (u16::from_be_bytes([s0, s1]), u16::from_be_bytes([d0, d1]), flags, SCTP_HLEN + SCTP_CHUNK_HLEN)
        }
    };
    if (tot_len as usize) < ihl + l4_min {
        return None;
    }

    Some(Packet {
        l3: l3 as u8,
        l4: l4 as u8,
        l2_len: l2_len as u8,
        ip_len: tot_len,
        plain_ip: ihl == 20,
        key: CtKey::new(saddr, daddr, sport, dport, proto),
        proto: l4_proto,
        tcp_flags,
        fragment,
        ip_id,
    })
}
