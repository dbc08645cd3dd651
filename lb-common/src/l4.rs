//! Transport protocols and what each means to the dataplane: where its
//! checksum sits, how long an idle flow lives, what it is called. The
//! programs match on `L4` explicitly; a protocol that is not listed here,
//! or that a program does not translate yet, is passed untouched.

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

const SEC: u64 = 1_000_000_000;

/// A transport protocol a Service port can use.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4 {
    Tcp = IPPROTO_TCP,
    Udp = IPPROTO_UDP,
    Sctp = IPPROTO_SCTP,
}

impl L4 {
    pub const ALL: [L4; 3] = [L4::Tcp, L4::Udp, L4::Sctp];

    /// The protocol of an IP header's protocol number, if it is one of ours.
    pub const fn from_proto(proto: u8) -> Option<Self> {
        match proto {
            IPPROTO_TCP => Some(Self::Tcp),
            IPPROTO_UDP => Some(Self::Udp),
            IPPROTO_SCTP => Some(Self::Sctp),
            _ => None,
        }
    }

    /// The IP protocol number (what map keys hold).
    pub const fn proto(self) -> u8 {
        self as u8
    }

    /// The name Kubernetes uses (`protocol: TCP`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }

    /// The Kubernetes name back to the protocol.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// Offset of the checksum field in the transport header, for
    /// incremental updates after a rewrite. SCTP's CRC32c covers the ports
    /// and cannot be updated incrementally: none.
    pub const fn csum_offset(self) -> Option<usize> {
        match self {
            Self::Tcp => Some(16),
            Self::Udp => Some(6),
            Self::Sctp => None,
        }
    }

    /// Smallest transport header: where the ports are, and what a packet
    /// must at least carry to be translated.
    pub const fn min_header(self) -> usize {
        match self {
            Self::Tcp => 20,
            Self::Udp => 8,
            Self::Sctp => 12,
        }
    }

    /// A checksum of 0 means "none was computed" and must stay 0 (RFC 768).
    pub const fn zero_csum_means_none(self) -> bool {
        matches!(self, Self::Udp)
    }

    /// How long an idle flow lives, in `CLOCK_MONOTONIC` nanoseconds;
    /// `closing`: a FIN or RST was seen (TCP).
    pub const fn idle_timeout(self, closing: bool) -> u64 {
        match self {
            // kube-proxy sets conntrack's established timeout to 24 h.
            Self::Tcp if closing => 10 * SEC,
            Self::Tcp => 86_400 * SEC,
            Self::Udp => 60 * SEC,
            // As netfilter's SCTP established timeout (5 days) is too long
            // for a table without a state machine, take TCP's; an ABORT or
            // SHUTDOWN COMPLETE ends it as a RST does.
            Self::Sctp if closing => 10 * SEC,
            Self::Sctp => 86_400 * SEC,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names_round_trip() {
        for l4 in L4::ALL {
            assert_eq!(L4::from_proto(l4.proto()), Some(l4));
            assert_eq!(L4::from_name(l4.name()), Some(l4));
        }
        assert_eq!(L4::from_proto(IPPROTO_ICMP), None);
        assert_eq!(L4::from_name("tcp"), None, "Kubernetes names are upper case");
    }

    #[test]
    fn only_udp_keeps_a_zero_checksum() {
        assert!(L4::Udp.zero_csum_means_none());
        assert!(!L4::Tcp.zero_csum_means_none());
        assert_eq!(L4::Sctp.csum_offset(), None);
    }

    #[test]
    fn a_closing_tcp_flow_expires_sooner() {
        assert!(L4::Tcp.idle_timeout(true) < L4::Udp.idle_timeout(false));
        assert!(L4::Udp.idle_timeout(false) < L4::Tcp.idle_timeout(false));
    }
}
