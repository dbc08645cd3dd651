//! Map names, keys and values.
//!
//! Every key and value is `#[repr(C)]` with explicit padding fields: a key with
//! implicit padding bytes makes hash lookups miss. Addresses are kept as
//! network-order byte arrays and ports in host order, so `bpftool map dump`
//! prints them readably. IPv4 maps carry 4-byte addresses; IPv6 gets its own
//! maps (`*6` names) with 16-byte addresses, leaving the IPv4 path unchanged.

/// Service frontends: `FrontendKey` → `Frontend`.
pub const MAP_SERVICES: &str = "lb_services";
/// Backends shared by every service that points at them: backend id → `Backend`.
pub const MAP_BACKENDS: &str = "lb_backends";
/// Per-frontend backend slots: `SlotKey` → backend id.
pub const MAP_SLOTS: &str = "lb_slots";
/// Connection tracking, both directions of every flow: `CtKey` → `CtEntry`.
pub const MAP_CONNTRACK: &str = "lb_conntrack";
/// ClientIP session affinity: `AffinityKey` → `AffinityEntry`.
pub const MAP_AFFINITY: &str = "lb_affinity";
/// Backends a frontend with affinity may still use: `AffinityMatchKey` → slot.
pub const MAP_AFFINITY_MATCH: &str = "lb_affinity_match";
/// loadBalancerSourceRanges: LPM trie over (frontend id, client prefix).
pub const MAP_SOURCE_RANGES: &str = "lb_source_ranges";
/// This node's addresses (NodePort frontends answer on them): address → flags.
pub const MAP_NODE_ADDRS: &str = "lb_node_addrs";
/// Per-CPU per-frontend counters, indexed by frontend id.
pub const MAP_SVC_STATS: &str = "lb_svc_stats";
/// Per-CPU drop counters, indexed by `Drop` reason.
pub const MAP_DROPS: &str = "lb_drops";
/// Single-entry runtime configuration (`Config`).
pub const MAP_CONFIG: &str = "lb_config";

/// Every map the programs define, in the order the reconciler fills them.
pub const ALL_MAPS: &[&str] = &[
    MAP_CONFIG,
    MAP_NODE_ADDRS,
    MAP_BACKENDS,
    MAP_SLOTS,
    MAP_AFFINITY_MATCH,
    MAP_SOURCE_RANGES,
    MAP_SERVICES,
    MAP_CONNTRACK,
    MAP_AFFINITY,
    MAP_SVC_STATS,
    MAP_DROPS,
];

/// Compiled-in capacities. The agent may raise them at load time
/// (`EbpfLoader::map_max_entries`), e.g. for 100,000-service benchmarks.
pub mod capacity {
    pub const SERVICES: u32 = 65_536;
    pub const BACKENDS: u32 = 65_536;
    pub const SLOTS: u32 = 262_144;
    pub const CONNTRACK: u32 = 262_144;
    pub const AFFINITY: u32 = 65_536;
    pub const AFFINITY_MATCH: u32 = 65_536;
    pub const SOURCE_RANGES: u32 = 16_384;
    pub const NODE_ADDRS: u32 = 64;
    /// Frontend ids are indexes into `lb_svc_stats`, so they stay below this.
    pub const SVC_STATS: u32 = 262_144;
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// A service frontend: the address, port and protocol clients connect to.
/// NodePort frontends use the unspecified address `0.0.0.0` and match any
/// address in `lb_node_addrs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl FrontendKey {
    pub const fn new(addr: [u8; 4], port: u16, proto: u8) -> Self {
        Self { addr, port, proto, _pad: 0 }
    }
}

/// Which Kubernetes field created a frontend.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp = 1,
    NodePort = 2,
    LoadBalancer = 3,
    ExternalIp = 4,
}

impl FrontendKind {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::ClusterIp),
            2 => Some(Self::NodePort),
            3 => Some(Self::LoadBalancer),
            4 => Some(Self::ExternalIp),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
            Self::ExternalIp => "ExternalIP",
        }
    }
}

/// Frontend flags (`Frontend::flags`).
pub mod frontend_flags {
    /// sessionAffinity ClientIP: reuse the client's last backend.
    pub const AFFINITY: u8 = 1 << 0;
    /// Only clients inside `lb_source_ranges` for this frontend may connect.
    pub const SOURCE_RANGES: u8 = 1 << 1;
    /// Traffic policy Local: slots hold node-local endpoints only, and a
    /// frontend with none drops instead of rejecting.
    pub const LOCAL_ONLY: u8 = 1 << 2;
}

/// What a frontend resolves to. Each frontend has its own id and slot set,
/// since traffic policies make the ClusterIP and the NodePort of one service
/// port select from different endpoints.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frontend {
    /// Frontend id: key of its slots, affinity and counters (< `capacity::SVC_STATS`).
    pub id: u32,
    /// Slots `0..backend_count` hold the backends new connections may use.
    pub backend_count: u32,
    /// ClientIP affinity timeout in seconds (with `frontend_flags::AFFINITY`).
    pub affinity_timeout: u32,
    /// A `FrontendKind`.
    pub kind: u8,
    /// `frontend_flags`.
    pub flags: u8,
    pub _pad: u16,
}

/// Backend flags (`Backend::flags`).
pub mod backend_flags {
    /// The endpoint runs on this node: no SNAT is needed to reach it.
    pub const LOCAL: u8 = 1 << 0;
}

/// A backend endpoint (pod address and target port), shared by every
/// frontend that uses it. Its id is the key in `lb_backends`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
    /// `backend_flags`.
    pub flags: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub frontend_id: u32,
    pub slot: u32,
}

/// A connection tracking key: the packet's 5-tuple as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl CtKey {
    pub const fn new(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16, proto: u8) -> Self {
        Self { saddr, daddr, sport, dport, proto, _pad: [0; 3] }
    }

    /// The same flow seen from the other end.
    pub const fn reversed(&self) -> Self {
        Self::new(self.daddr, self.saddr, self.dport, self.sport, self.proto)
    }
}

/// Conntrack entry flags (`CtEntry::flags`).
pub mod ct_flags {
    /// This entry matches replies (backend → client); otherwise requests.
    pub const REPLY: u8 = 1 << 0;
    /// Rewrite the source address and port to `nat_saddr:nat_sport`.
    pub const REWRITE_SRC: u8 = 1 << 1;
    /// Rewrite the destination address and port to `nat_daddr:nat_dport`.
    pub const REWRITE_DST: u8 = 1 << 2;
    /// The flow is source-NATed to this node (external client, remote backend).
    pub const SNAT: u8 = 1 << 3;
}

/// TCP flags seen in this entry's direction (`CtEntry::tcp`).
pub mod ct_tcp {
    pub const SYN: u8 = 1 << 0;
    pub const FIN: u8 = 1 << 1;
    pub const RST: u8 = 1 << 2;
}

/// Idle timeouts, in nanoseconds of `CLOCK_MONOTONIC`.
pub mod ct_timeout {
    const SEC: u64 = 1_000_000_000;
    /// An open TCP flow (kube-proxy sets conntrack's established timeout to 24 h).
    pub const TCP: u64 = 86_400 * SEC;
    /// After a FIN or RST in either direction of the entry.
    pub const TCP_CLOSING: u64 = 10 * SEC;
    pub const UDP: u64 = 60 * SEC;
    /// `last_seen` is refreshed at most this often, to keep the entry's cache
    /// line out of the per-packet write path.
    pub const REFRESH: u64 = SEC;
    /// A cached next hop is looked up in the FIB again after this long, so
    /// route and neighbour changes reach established flows.
    pub const NEXT_HOP: u64 = SEC;
}

/// Slots of the next-hop cache (`lb_next_hops`, per CPU).
pub const NEXT_HOP_SLOTS: u32 = 256;

/// A recent answer of the FIB for packets XDP sends back out (XDP_TX): the
/// next hop towards `daddr` arriving on `ifindex`. Kept per CPU in a small
/// direct-mapped table (`next_hop_slot`), so established packets skip the
/// lookup; zero `ifindex`: empty.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    pub daddr: [u8; 4],
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub _pad: u32,
    /// `CLOCK_MONOTONIC` nanoseconds after which the FIB is asked again.
    pub until: u64,
}

impl NextHop {
    pub const fn answers(&self, ifindex: u32, daddr: [u8; 4], now: u64) -> bool {
        self.ifindex != 0
            && self.ifindex == ifindex
            && u32::from_ne_bytes(self.daddr) == u32::from_ne_bytes(daddr)
            && now < self.until
    }
}

/// The cache slot of `daddr`: Fibonacci hashing to 8 bits.
pub const fn next_hop_slot(daddr: [u8; 4]) -> u32 {
    u32::from_be_bytes(daddr).wrapping_mul(0x9E37_79B1) >> 24
}

/// One direction of a tracked flow: how to rewrite its packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntry {
    pub nat_saddr: [u8; 4],
    pub nat_daddr: [u8; 4],
    pub nat_sport: u16,
    pub nat_dport: u16,
    pub backend_id: u32,
    pub frontend_id: u32,
    pub _pad0: u32,
    /// `CLOCK_MONOTONIC` nanoseconds of the last packet (refreshed lazily).
    pub last_seen: u64,
    /// `ct_flags`.
    pub flags: u8,
    /// `ct_tcp` flags seen in this direction.
    pub tcp: u8,
    pub _pad1: [u8; 6],
}

/// The rewrite a conntrack entry applies to its packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Nat {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    /// `ct_flags` (REWRITE_SRC, REWRITE_DST, SNAT).
    pub flags: u8,
}

impl CtEntry {
    pub const fn nat(&self) -> Nat {
        Nat {
            saddr: self.nat_saddr,
            daddr: self.nat_daddr,
            sport: self.nat_sport,
            dport: self.nat_dport,
            flags: self.flags,
        }
    }

    pub const fn is_reply(&self) -> bool {
        self.flags & ct_flags::REPLY != 0
    }

    /// The idle timeout that applies to this entry.
    pub const fn timeout(&self, proto: u8) -> u64 {
        if proto == IPPROTO_TCP {
            if self.tcp & (ct_tcp::FIN | ct_tcp::RST) != 0 {
                ct_timeout::TCP_CLOSING
            } else {
                ct_timeout::TCP
            }
        } else {
            ct_timeout::UDP
        }
    }

    pub const fn expired(&self, proto: u8, now: u64) -> bool {
        now.saturating_sub(self.last_seen) > self.timeout(proto)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub frontend_id: u32,
    pub client: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityEntry {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_used: u64,
}

/// Present while `backend_id` is a live choice for `frontend_id`, so that a
/// client's affinity ends when its backend leaves the service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityMatchKey {
    pub frontend_id: u32,
    pub backend_id: u32,
}

/// Data of an `lb_source_ranges` LPM key: the frontend id (all 32 bits always
/// match) followed by the client address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceRangeKey {
    pub frontend_id: [u8; 4],
    pub addr: [u8; 4],
}

impl SourceRangeKey {
    pub const fn new(frontend_id: u32, addr: [u8; 4]) -> Self {
        Self { frontend_id: frontend_id.to_be_bytes(), addr }
    }

    /// The LPM prefix length for a client prefix of `cidr_len` bits.
    pub const fn prefix_len(cidr_len: u8) -> u32 {
        32 + cidr_len as u32
    }
}

/// Per-frontend counters (per CPU; the agent sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Why a packet for a service was dropped (index into `lb_drops`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// Traffic policy Local and no local endpoint.
    NoLocalEndpoint = 0,
    /// Client outside the frontend's loadBalancerSourceRanges.
    SourceRange = 1,
    /// No free SNAT port for this backend.
    NatExhausted = 2,
    /// No endpoint: answered with ICMP port unreachable (counted, not silent).
    Rejected = 3,
    /// A packet of a known flow could not be rewritten (helper failure).
    RewriteFailed = 4,
    /// Conntrack map full (insert failed).
    ConntrackFull = 5,
}

impl Drop {
    pub const COUNT: u32 = 6;
    pub const ALL: [Drop; Self::COUNT as usize] = [
        Self::NoLocalEndpoint,
        Self::SourceRange,
        Self::NatExhausted,
        Self::Rejected,
        Self::RewriteFailed,
        Self::ConntrackFull,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoLocalEndpoint => "no_local_endpoint",
            Self::SourceRange => "source_range",
            Self::NatExhausted => "nat_exhausted",
            Self::Rejected => "rejected_no_endpoint",
            Self::RewriteFailed => "rewrite_failed",
            Self::ConntrackFull => "conntrack_full",
        }
    }
}

/// Runtime configuration, entry 0 of `lb_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Source address for SNAT toward remote backends (this node's address).
    pub snat_addr: [u8; 4],
    /// SNAT source ports come from `nat_port_min..=nat_port_max`; the default
    /// sits above the kernel's ephemeral range so it cannot collide with the
    /// node's own connections.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
}

pub const DEFAULT_NAT_PORT_MIN: u16 = 61_000;
pub const DEFAULT_NAT_PORT_MAX: u16 = 65_535;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and every bit pattern is valid.
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for Frontend {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for AffinityMatchKey {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for SvcStats {}
    unsafe impl aya::Pod for Config {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn keys_have_no_implicit_padding() {
        assert_eq!(size_of::<FrontendKey>(), 4 + 2 + 1 + 1);
        assert_eq!(size_of::<CtKey>(), 4 + 4 + 2 + 2 + 1 + 3);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityMatchKey>(), 8);
        assert_eq!(size_of::<SourceRangeKey>(), 8);
        assert_eq!(size_of::<CtEntry>(), 4 + 4 + 2 + 2 + 4 + 4 + 4 + 8 + 1 + 1 + 6);
        assert_eq!(size_of::<Frontend>(), 16);
        assert_eq!(size_of::<NextHop>(), 32);
        assert_eq!(size_of::<Backend>(), 8);
    }

    #[test]
    fn tcp_entries_expire_early_once_closing() {
        let mut e = CtEntry { last_seen: 1_000, ..Default::default() };
        let later = 1_000 + 20 * 1_000_000_000;
        assert!(!e.expired(IPPROTO_TCP, later));
        e.tcp |= ct_tcp::FIN;
        assert!(e.expired(IPPROTO_TCP, later));
        assert!(!e.expired(IPPROTO_UDP, later));
    }

    #[test]
    fn reversed_swaps_ends() {
        let k = CtKey::new([1, 1, 1, 1], [2, 2, 2, 2], 10, 20, IPPROTO_UDP);
        assert_eq!(k.reversed(), CtKey::new([2, 2, 2, 2], [1, 1, 1, 1], 20, 10, IPPROTO_UDP));
        assert_eq!(k.reversed().reversed(), k);
    }

    #[test]
    fn next_hop_slots_spread_neighbouring_addresses() {
        let mut used = [false; NEXT_HOP_SLOTS as usize];
        for i in 0..64u8 {
            used[next_hop_slot([10, 244, 1, i]) as usize] = true;
        }
        let distinct = used.iter().filter(|u| **u).count();
        assert!(distinct > 48, "{distinct} distinct slots for 64 addresses");
    }

    #[test]
    fn a_next_hop_answers_only_its_destination_until_it_expires() {
        let hop = NextHop { ifindex: 2, daddr: [10, 0, 0, 1], until: 100, ..Default::default() };
        assert!(hop.answers(2, [10, 0, 0, 1], 99));
        assert!(!hop.answers(2, [10, 0, 0, 1], 100));
        assert!(!hop.answers(3, [10, 0, 0, 1], 0));
        assert!(!hop.answers(2, [10, 0, 0, 2], 0));
        assert!(!NextHop::default().answers(0, [0; 4], 0));
    }
}
