//! Every map the programs define, in one table: names, kinds, capacities and
//! whether operators may size them. The loader, `lb-agent reset`, `inspect
//! maps`, the metrics and the command line all walk `MAPS`; the eBPF crate
//! declares each map with its name and capacity from here, and a test checks
//! the built object against this table.

/// The kernel map type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapType {
    Hash,
    LruHash,
    Array,
    PerCpuArray,
    LpmTrie,
}

impl MapType {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Hash => "hash",
            Self::LruHash => "lru_hash",
            Self::Array => "array",
            Self::PerCpuArray => "percpu_array",
            Self::LpmTrie => "lpm_trie",
        }
    }
}

/// How many entries a map holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    Fixed(u32),
    /// Set by the `lb-agent run` flag `--<flag>`; maps naming the same flag
    /// grow together.
    Flag {
        flag: &'static str,
        default: u32,
    },
}

impl Size {
    pub const fn default_entries(self) -> u32 {
        match self {
            Self::Fixed(n) | Self::Flag { default: n, .. } => n,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    pub name: &'static str,
    pub map_type: MapType,
    pub size: Size,
    /// Pinned under the agent's pin directory, shared by every load and
    /// kept across restarts; otherwise private to one load (a cache).
    pub pinned: bool,
    /// Whether the reconciler writes it (and so `Reconciler::adopt` reads it).
    pub programmed: bool,
    /// What it holds, for `inspect maps`.
    pub about: &'static str,
}

impl MapDef {
    pub const fn capacity(&self) -> u32 {
        self.size.default_entries()
    }
}

macro_rules! maps {
    ($($id:ident: $name:literal, $ty:ident, $size:expr, pinned: $pinned:literal, programmed: $prog:literal, $about:literal;)*) => {
        $(pub const $id: MapDef = MapDef {
            name: $name,
            map_type: MapType::$ty,
            size: $size,
            pinned: $pinned,
            programmed: $prog,
            about: $about,
        };)*
        /// Every map of `lb-ebpf`, in the order the reconciler fills the programmed ones.
        pub const MAPS: &[MapDef] = &[$($id),*];
    };
}

const fn flag(flag: &'static str, default: u32) -> Size {
    Size::Flag { flag, default }
}

maps! {
    CONFIG: "lb_config", Array, Size::Fixed(1), pinned: true, programmed: true,
        "runtime settings: SNAT address and port range";
    NODE_ADDRS: "lb_node_addrs", Hash, Size::Fixed(64), pinned: true, programmed: true,
        "this node's addresses (NodePort answers on them)";
    CLUSTER_IPS: "lb_cluster_ips", Hash, flag("max-frontends", 65_536), pinned: true, programmed: true,
        "allocated ClusterIPs: the catch-all rejects their unused ports";
    SERVICE_CIDRS: "lb_svc_cidrs", LpmTrie, Size::Fixed(64), pinned: true, programmed: true,
        "the service CIDRs (--service-cidr): unallocated addresses in them are dropped";
    BACKENDS: "lb_backends", Hash, flag("max-backends", 65_536), pinned: true, programmed: true,
        "backend id -> pod address, port, protocol, flags";
    SLOTS: "lb_slots", Hash, flag("max-slots", 262_144), pinned: true, programmed: true,
        "(frontend id, slot) -> backend id; slots below the frontend's count are live";
    ENDPOINTS: "lb_endpoints", Hash, flag("max-endpoints", 262_144), pinned: true, programmed: true,
        "(frontend id, backend id) while the backend is one of the frontend's endpoints: UDP flows keep it only then";
    AFFINITY_MATCH: "lb_aff_match", Hash, Size::Fixed(65_536), pinned: true, programmed: true,
        "(frontend id, backend id) present while a ClientIP-affinity backend may be chosen";
    SOURCE_RANGES: "lb_src_ranges", LpmTrie, Size::Fixed(16_384), pinned: true, programmed: true,
        "loadBalancerSourceRanges: (frontend id, client prefix)";
    SERVICE_NAMES: "lb_svc_names", Hash, flag("max-frontends", 65_536), pinned: true, programmed: true,
        "frontend id -> the Service it serves (namespace, name, port name)";
    POD_IFS: "lb_pod_ifs", Hash, Size::Fixed(4096), pinned: true, programmed: false,
        "host-side pod interfaces (ifindex): translated packets for their pods go straight in";
    SERVICES: "lb_services", Hash, flag("max-frontends", 65_536), pinned: true, programmed: true,
        "frontend (address, port, protocol, scope) -> id, backend count, kind, flags";
    CONNTRACK: "lb_conntrack", LruHash, flag("conntrack-size", 262_144), pinned: true, programmed: false,
        "LRU: both directions of every flow -> rewrite, backend, frontend, last seen";
    AFFINITY: "lb_affinity", LruHash, flag("affinity-size", 65_536), pinned: true, programmed: false,
        "LRU: (frontend id, client) -> the client's ClientIP-affinity backend";
    SOCK_REV: "lb_sock_rev", LruHash, flag("sock-rev-size", 262_144), pinned: true, programmed: false,
        "LRU: (socket cookie, backend) -> the service address the socket hooks translated";
    FRAGMENTS: "lb_fragments", LruHash, Size::Fixed(16_384), pinned: false, programmed: false,
        "LRU: (source, destination, IP id, protocol) of a datagram in fragments -> its first fragment's rewrite";
    SVC_STATS: "lb_svc_stats", PerCpuArray, Size::Fixed(262_144), pinned: true, programmed: false,
        "per-CPU counters per frontend id (packets, bytes, new flows)";
    DROPS: "lb_drops", PerCpuArray, Size::Fixed(crate::Drop::SLOTS), pinned: true, programmed: false,
        "per-CPU drop counters by reason";
    EVENTS: "lb_events", PerCpuArray, Size::Fixed(crate::Event::SLOTS), pinned: true, programmed: false,
        "per-CPU counters of pressure events (flows recreated, NAT ports reclaimed or remapped)";
    NEXT_HOPS: "lb_next_hops", PerCpuArray, Size::Fixed(crate::NEXT_HOP_SLOTS), pinned: false, programmed: false,
        "per-CPU cache of the FIB's next hop for XDP_TX (one second)";
    FLOW_BUF: "lb_flow_buf", PerCpuArray, Size::Fixed(1), pinned: false, programmed: false,
        "per-CPU scratch space for a new flow's reply entry";
    REJECT_SCRATCH: "lb_reject_buf", PerCpuArray, Size::Fixed(1), pinned: false, programmed: false,
        "per-CPU scratch space for building ICMP replies";
}

/// The map called `name`.
pub fn map(name: &str) -> Option<&'static MapDef> {
    MAPS.iter().find(|m| m.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_prefixed() {
        for (i, m) in MAPS.iter().enumerate() {
            assert!(m.name.starts_with("lb_") && m.name.len() < 16, "{}: bpffs names stay short", m.name);
            assert!(MAPS[..i].iter().all(|o| o.name != m.name), "{} twice", m.name);
        }
    }

    #[test]
    fn maps_sharing_a_flag_share_its_default() {
        for a in MAPS {
            for b in MAPS {
                if let (Size::Flag { flag: fa, default: da }, Size::Flag { flag: fb, default: db }) =
                    (a.size, b.size)
                    && fa == fb
                {
                    assert_eq!(da, db, "--{fa}");
                }
            }
        }
    }

    #[test]
    fn programmed_maps_are_pinned() {
        assert!(MAPS.iter().filter(|m| m.programmed).all(|m| m.pinned));
    }
}
