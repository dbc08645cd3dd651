//! Map keys and values.
//!
//! Every key and value is `#[repr(C)]` with explicit padding fields: a key with
//! implicit padding bytes makes hash lookups miss. Addresses are kept as
//! network-order byte arrays and ports in host order, so `bpftool map dump`
//! prints them readably. IPv4 maps carry 4-byte addresses; IPv6 gets its own
//! maps (`*6` names) with 16-byte addresses, leaving the IPv4 path unchanged.
//! The maps themselves are listed in `registry`.

use crate::L4;

/// Which clients a frontend serves. kube-proxy gives in-cluster clients
/// (pods, the node itself) Cluster behaviour even where a Service's
/// externalTrafficPolicy is Local: such a frontend has an `Internal` twin,
/// which the pod and socket hooks look up instead (`TWO_SCOPES`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Every client; the only entry of most frontends.
    #[default]
    External = 0,
    /// In-cluster clients, where they are treated differently.
    Internal = 1,
}

impl Scope {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::External),
            1 => Some(Self::Internal),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::External => "external",
            Self::Internal => "internal",
        }
    }
}

/// A service frontend: the address, port and protocol clients connect to,
/// and which clients (`Scope`). NodePort frontends use the unspecified
/// address `0.0.0.0` and match any address in `lb_node_addrs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
    /// A `Scope`.
    pub scope: u8,
}

impl FrontendKey {
    pub const fn new(addr: [u8; 4], port: u16, l4: L4, scope: Scope) -> Self {
        Self { addr, port, proto: l4.proto(), scope: scope as u8 }
    }

    /// The same frontend for the other scope.
    pub const fn with_scope(self, scope: Scope) -> Self {
        Self { scope: scope as u8, ..self }
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
    /// An external-scope frontend whose in-cluster clients use its
    /// `Scope::Internal` twin instead.
    pub const TWO_SCOPES: u8 = 1 << 3;
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

/// An IPv4 datagram's fragments (`lb_fragments`): what they all carry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// The IPv4 identification field, in network order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// How the first fragment of a datagram was translated, for the ones that
/// follow it: they carry no ports, so they get its addresses (and go where
/// it went).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragEntry {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub frontend_id: u32,
    /// `ct_flags` of the first fragment's rewrite.
    pub flags: u8,
    pub _pad: [u8; 3],
    /// `CLOCK_MONOTONIC` nanoseconds of the first fragment.
    pub seen: u64,
}

impl FragEntry {
    pub const fn new(nat: &Nat, frontend_id: u32, seen: u64) -> Self {
        Self { saddr: nat.saddr, daddr: nat.daddr, frontend_id, flags: nat.flags, _pad: [0; 3], seen }
    }

    /// Whether the later fragments of its datagram may still come: the
    /// kernel's reassembly gives up on a datagram after 30 s
    /// (`ipfrag_time`), and an IP id is reused sooner or later.
    pub const fn live(&self, now: u64) -> bool {
        now.saturating_sub(self.seen) <= ct_timeout::FRAGMENTS
    }

    /// The rewrite for a later fragment (no ports to change).
    pub const fn nat(&self) -> Nat {
        Nat { saddr: self.saddr, daddr: self.daddr, sport: 0, dport: 0, flags: self.flags }
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
    /// The flow's requests go around the host stack (redirected at TC), so
    /// its replies do too: a firewall in the stack then sees neither
    /// direction, rather than half a connection.
    pub const BYPASS: u8 = 1 << 4;
}

/// TCP flags seen in this entry's direction (`CtEntry::tcp`).
pub mod ct_tcp {
    pub const SYN: u8 = 1 << 0;
    pub const FIN: u8 = 1 << 1;
    pub const RST: u8 = 1 << 2;
}

/// Conntrack clocks, in nanoseconds of `CLOCK_MONOTONIC`; idle timeouts
/// are per protocol (`L4::idle_timeout`).
pub mod ct_timeout {
    const SEC: u64 = 1_000_000_000;
    /// `last_seen` is refreshed at most this often, to keep the entry's cache
    /// line out of the per-packet write path.
    pub const REFRESH: u64 = SEC;
    /// A cached next hop is looked up in the FIB again after this long, so
    /// route and neighbour changes reach established flows.
    pub const NEXT_HOP: u64 = SEC;
    /// How long a first fragment's rewrite waits for the later fragments:
    /// the kernel's reassembly timeout (`ipfrag_time`).
    pub const FRAGMENTS: u64 = 30 * SEC;
}

/// Slots of the next-hop cache (`lb_next_hops`, per CPU).
pub const NEXT_HOP_SLOTS: u32 = 256;

/// Next-hop flags (`NextHop::flags`).
pub mod next_hop_flags {
    /// `oif` is the host side of a pod's interface: redirect into the pod
    /// itself (`bpf_redirect_peer`), not out of the host side.
    pub const PEER: u32 = 1 << 0;
}

/// A recent answer of the FIB for translated packets the programs send on
/// themselves (XDP_TX, or a redirect at TC): the next hop towards `daddr`
/// for packets that arrived on `ingress`. Kept per CPU in a small
/// direct-mapped table (`next_hop_slot`), so established packets skip the
/// lookup; zero `ingress`: empty.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub ingress: u32,
    pub daddr: [u8; 4],
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// The interface the packet leaves by.
    pub oif: u32,
    /// `next_hop_flags`.
    pub flags: u32,
    /// `CLOCK_MONOTONIC` nanoseconds after which the FIB is asked again.
    pub until: u64,
}

impl NextHop {
    pub const fn answers(&self, ingress: u32, daddr: [u8; 4], now: u64) -> bool {
        self.ingress != 0
            && self.ingress == ingress
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

/// A new flow's reply entry while it is built and claimed (per CPU, in
/// `lb_flow_buf`: the BPF stack is too small to hold it beside its callers).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBuf {
    pub reply_key: CtKey,
    pub reply: CtEntry,
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

    /// A FIN or RST was seen in this entry's direction.
    pub const fn closing(&self) -> bool {
        self.tcp & (ct_tcp::FIN | ct_tcp::RST) != 0
    }

    /// Idle for longer than its protocol allows; an entry of a protocol we
    /// do not know is expired.
    pub const fn expired(&self, proto: u8, now: u64) -> bool {
        match L4::from_proto(proto) {
            Some(l4) => now.saturating_sub(self.last_seen) > l4.idle_timeout(self.closing()),
            None => true,
        }
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

/// Why a packet for a service was dropped (index into `lb_drops`). The
/// numbers are stable: they are what the pinned counters are kept under.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// Traffic policy Local and no local endpoint.
    NoLocalEndpoint = 0,
    /// Client outside the frontend's loadBalancerSourceRanges.
    SourceRange = 1,
    /// No free SNAT port toward this backend.
    NatExhausted = 2,
    /// No endpoint: answered with ICMP port unreachable (counted, not silent).
    Rejected = 3,
    /// A packet of a known flow could not be rewritten (helper failure).
    RewriteFailed = 4,
    /// Conntrack map full (insert failed).
    ConntrackFull = 5,
    /// A frontend's slot or its backend is missing: the maps disagree with
    /// each other (the reconciler's write order should make this impossible).
    NoBackend = 6,
    /// `lb_config` is not programmed yet, so SNAT has no address.
    NoConfig = 7,
    /// No endpoint, and the ICMP answer could not be built (IP options,
    /// helper failure): dropped unanswered.
    RejectFailed = 8,
    /// An allocated ClusterIP on a port no Service uses: answered port
    /// unreachable (kube-proxy's nftables catch-all).
    ClusterIpPort = 9,
    /// An address of the service CIDR no Service has: dropped.
    UnallocatedClusterIp = 10,
}

impl Drop {
    pub const COUNT: u32 = 11;
    /// Slots of `lb_drops`: room for reasons to come without a layout change.
    pub const SLOTS: u32 = 32;
    pub const ALL: [Drop; Self::COUNT as usize] = [
        Self::NoLocalEndpoint,
        Self::SourceRange,
        Self::NatExhausted,
        Self::Rejected,
        Self::RewriteFailed,
        Self::ConntrackFull,
        Self::NoBackend,
        Self::NoConfig,
        Self::RejectFailed,
        Self::ClusterIpPort,
        Self::UnallocatedClusterIp,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoLocalEndpoint => "no_local_endpoint",
            Self::SourceRange => "source_range",
            Self::NatExhausted => "nat_exhausted",
            Self::Rejected => "rejected_no_endpoint",
            Self::RewriteFailed => "rewrite_failed",
            Self::ConntrackFull => "conntrack_full",
            Self::NoBackend => "no_backend",
            Self::NoConfig => "no_config",
            Self::RejectFailed => "reject_failed",
            Self::ClusterIpPort => "rejected_cluster_ip_port",
            Self::UnallocatedClusterIp => "unallocated_cluster_ip",
        }
    }
}

/// Things the dataplane does that are not drops but tell of pressure
/// (index into `lb_events`). Numbers are stable.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A TCP packet other than a SYN opened a flow: the flow's conntrack
    /// entries had been evicted (a full table) or had expired.
    CtRecreated = 0,
    /// A NAT port (or a reply tuple) was taken back from a flow that had
    /// ended (RST, FIN both ways) or gone idle past its timeout.
    NatReclaimed = 1,
    /// Two flows would have had the same reply tuple (one client port to two
    /// frontends sharing a backend): the new one got another source port.
    NatRemapped = 2,
}

impl Event {
    pub const COUNT: u32 = 3;
    pub const SLOTS: u32 = 32;
    pub const ALL: [Event; Self::COUNT as usize] = [Self::CtRecreated, Self::NatReclaimed, Self::NatRemapped];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::CtRecreated => "conntrack_recreated",
            Self::NatReclaimed => "nat_reclaimed",
            Self::NatRemapped => "nat_remapped",
        }
    }
}

/// Longest namespace and Service name (a DNS label: 63 bytes) plus a NUL.
pub const NAME_LEN: usize = 64;
/// Longest port name (an IANA service name: 15 bytes) plus a NUL.
pub const PORT_NAME_LEN: usize = 16;

/// The Service a frontend serves (`lb_svc_names`), NUL-padded, so that an
/// operator reading the maps sees more than addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceName {
    pub namespace: [u8; NAME_LEN],
    pub name: [u8; NAME_LEN],
    pub port: [u8; PORT_NAME_LEN],
}

impl Default for ServiceName {
    fn default() -> Self {
        Self { namespace: [0; NAME_LEN], name: [0; NAME_LEN], port: [0; PORT_NAME_LEN] }
    }
}

/// `s` NUL-padded into `N` bytes, cut at a character boundary to leave a NUL.
fn padded<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let mut len = s.len().min(N - 1);
    while !s.is_char_boundary(len) {
        len -= 1;
    }
    out[..len].copy_from_slice(&s.as_bytes()[..len]);
    out
}

/// The text before the first NUL.
fn unpadded(b: &[u8]) -> &str {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    core::str::from_utf8(&b[..end]).unwrap_or("?")
}

impl ServiceName {
    pub fn new(namespace: &str, name: &str, port: &str) -> Self {
        Self { namespace: padded(namespace), name: padded(name), port: padded(port) }
    }

    pub fn namespace(&self) -> &str {
        unpadded(&self.namespace)
    }

    pub fn name(&self) -> &str {
        unpadded(&self.name)
    }

    pub fn port(&self) -> &str {
        unpadded(&self.port)
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
    /// `config_flags`.
    pub flags: u32,
}

/// A socket and a peer address: the key of the socket hooks' maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockKey {
    /// The socket's cookie (`bpf_get_socket_cookie`, `SO_COOKIE`).
    pub cookie: u64,
    pub addr: [u8; 4],
    pub port: u16,
    pub _pad: u16,
}

/// The service address a socket hook translated to a backend: given back to
/// the application by recvmsg() and getpeername().
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockService {
    pub addr: [u8; 4],
    pub port: u16,
    pub _pad: u16,
    /// The frontend the backend was chosen for: the agent terminates
    /// connected UDP sockets whose backend it no longer has.
    pub frontend_id: u32,
}

/// Runtime switches (`Config::flags`).
pub mod config_flags {
    /// Hand every translated packet to the host stack instead of
    /// redirecting it at TC (for hosts whose firewall or NetworkPolicy
    /// lives in netfilter and must see service traffic).
    pub const VIA_STACK: u32 = 1 << 0;
    /// Some endpoint is one of this node's own addresses (a hostNetwork
    /// server): its replies leave the host stack through egress, where
    /// `lb_tc_egress` looks for them only while this is set.
    pub const HOST_ENDPOINTS: u32 = 1 << 1;
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
    unsafe impl aya::Pod for ServiceName {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for SockService {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IPPROTO_TCP, IPPROTO_UDP};
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
        assert_eq!(size_of::<NextHop>(), 40);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<ServiceName>(), 144);
    }

    #[test]
    fn service_names_round_trip_and_are_cut_safely() {
        let n = ServiceName::new("default", "web", "http");
        assert_eq!((n.namespace(), n.name(), n.port()), ("default", "web", "http"));
        let long = "é".repeat(40);
        let cut = ServiceName::new(&long, "", "");
        assert!(cut.namespace().len() < NAME_LEN && long.starts_with(cut.namespace()));
        assert_eq!(cut.name(), "");
    }

    #[test]
    fn an_entry_of_an_unknown_protocol_is_expired() {
        let e = CtEntry { last_seen: 1_000, ..Default::default() };
        assert!(e.expired(crate::IPPROTO_ICMP, 1_000));
        assert!(!e.expired(crate::IPPROTO_SCTP, 1_000));
    }

    #[test]
    fn drop_reasons_fit_their_map_and_keep_their_numbers() {
        const { assert!(Drop::COUNT <= Drop::SLOTS) };
        for (i, d) in Drop::ALL.iter().enumerate() {
            assert_eq!(*d as u32, i as u32);
        }
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
        let hop = NextHop { ingress: 2, daddr: [10, 0, 0, 1], until: 100, ..Default::default() };
        assert!(hop.answers(2, [10, 0, 0, 1], 99));
        assert!(!hop.answers(2, [10, 0, 0, 1], 100));
        assert!(!hop.answers(3, [10, 0, 0, 1], 0));
        assert!(!hop.answers(2, [10, 0, 0, 2], 0));
        assert!(!NextHop::default().answers(0, [0; 4], 0));
    }
}
