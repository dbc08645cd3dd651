//! Typed handles on the dataplane maps, from a fresh load or from the pins
//! (for `inspect`, which works whether or not the agent runs), and the
//! kernel's `MapStore`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key},
};
use ipnet::Ipv4Net;
use lb_common::{
    AffinityEntry, AffinityKey, AffinityMatchKey, Backend, Config, CtEntry, CtKey, Frontend, FrontendKey,
    ServiceName, SlotKey, SockKey, SockService, SourceRangeKey, SvcStats,
    registry::{self as reg, MapDef},
};

use crate::reconciler::{MapStore, Op, Programmed, StoreError};

pub struct Maps {
    pub config: Array<MapData, Config>,
    pub node_addrs: HashMap<MapData, [u8; 4], u32>,
    pub cluster_ips: HashMap<MapData, [u8; 4], u32>,
    pub service_cidrs: LpmTrie<MapData, [u8; 4], u32>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub endpoints: HashMap<MapData, AffinityMatchKey, u32>,
    pub affinity_match: HashMap<MapData, AffinityMatchKey, u32>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey, u32>,
    pub names: HashMap<MapData, u32, ServiceName>,
    pub pod_ifs: HashMap<MapData, u32, u32>,
    pub services: HashMap<MapData, FrontendKey, Frontend>,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    pub svc_stats: PerCpuArray<MapData, SvcStats>,
    pub drops: PerCpuArray<MapData, u64>,
    pub events: PerCpuArray<MapData, u64>,
    pub sock_rev: HashMap<MapData, SockKey, SockService>,
    /// Each map's capacity as the kernel created it.
    capacities: BTreeMap<&'static str, u32>,
}

/// Where to get a map from.
trait Source {
    fn map(&mut self, def: &MapDef) -> Result<Map>;
}

impl Source for &mut Ebpf {
    fn map(&mut self, def: &MapDef) -> Result<Map> {
        self.take_map(def.name).with_context(|| format!("the eBPF object has no map {}", def.name))
    }
}

impl Source for &Path {
    fn map(&mut self, def: &MapDef) -> Result<Map> {
        let path = self.join(def.name);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {} (has the agent run?)", path.display()))?;
        Ok(Map::from_map_data(data)?)
    }
}

impl Maps {
    /// Takes the maps out of a loaded object.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self> {
        Self::from_source(ebpf)
    }

    /// Opens the maps pinned under `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Self::from_source(pin_dir)
    }

    fn from_source(mut src: impl Source) -> Result<Self> {
        let mut capacities = BTreeMap::new();
        macro_rules! typed {
            ($def:expr) => {{
                let map = src.map(&$def)?;
                if let Some(info) = map_data(&map).and_then(|d| d.info().ok()) {
                    capacities.insert($def.name, info.max_entries());
                }
                map.try_into().with_context(|| format!("map {} has an unexpected type", $def.name))?
            }};
        }
        Ok(Self {
            config: typed!(reg::CONFIG),
            node_addrs: typed!(reg::NODE_ADDRS),
            cluster_ips: typed!(reg::CLUSTER_IPS),
            service_cidrs: typed!(reg::SERVICE_CIDRS),
            backends: typed!(reg::BACKENDS),
            slots: typed!(reg::SLOTS),
            endpoints: typed!(reg::ENDPOINTS),
            affinity_match: typed!(reg::AFFINITY_MATCH),
            source_ranges: typed!(reg::SOURCE_RANGES),
            names: typed!(reg::SERVICE_NAMES),
            pod_ifs: typed!(reg::POD_IFS),
            services: typed!(reg::SERVICES),
            conntrack: typed!(reg::CONNTRACK),
            affinity: typed!(reg::AFFINITY),
            svc_stats: typed!(reg::SVC_STATS),
            drops: typed!(reg::DROPS),
            events: typed!(reg::EVENTS),
            sock_rev: typed!(reg::SOCK_REV),
            capacities,
        })
    }

    /// The capacity the kernel map was created with.
    pub fn capacity(&self, def: &MapDef) -> Option<u32> {
        self.capacities.get(def.name).copied()
    }

    /// Makes `lb_pod_ifs` hold exactly `ifindexes` (the host sides of the
    /// pod interfaces served): additions first, then removals.
    pub fn set_pod_ifs(&mut self, ifindexes: &BTreeSet<u32>) -> Result<()> {
        let present: BTreeSet<u32> = self.pod_ifs.keys().collect::<Result<_, _>>()?;
        for i in ifindexes.difference(&present) {
            self.pod_ifs
                .insert(i, &1, 0)
                .with_context(|| format!("adding pod interface {i} to lb_pod_ifs"))?;
        }
        for i in present.difference(ifindexes) {
            ignore_missing(self.pod_ifs.remove(i))?;
        }
        Ok(())
    }

    /// How many keys a hash, LRU or LPM map of the registry holds now
    /// (arrays have all their slots all the time: `None`).
    pub fn entries(&self, def: &MapDef) -> Option<usize> {
        Some(match def.name {
            n if n == reg::NODE_ADDRS.name => self.node_addrs.keys().count(),
            n if n == reg::CLUSTER_IPS.name => self.cluster_ips.keys().count(),
            n if n == reg::SERVICE_CIDRS.name => self.service_cidrs.keys().count(),
            n if n == reg::BACKENDS.name => self.backends.keys().count(),
            n if n == reg::SLOTS.name => self.slots.keys().count(),
            n if n == reg::ENDPOINTS.name => self.endpoints.keys().count(),
            n if n == reg::AFFINITY_MATCH.name => self.affinity_match.keys().count(),
            n if n == reg::SOURCE_RANGES.name => self.source_ranges.keys().count(),
            n if n == reg::SERVICE_NAMES.name => self.names.keys().count(),
            n if n == reg::POD_IFS.name => self.pod_ifs.keys().count(),
            n if n == reg::SERVICES.name => self.services.keys().count(),
            n if n == reg::CONNTRACK.name => self.conntrack.keys().count(),
            n if n == reg::AFFINITY.name => self.affinity.keys().count(),
            n if n == reg::SOCK_REV.name => self.sock_rev.keys().count(),
            _ => return None,
        })
    }
}

fn cidr_key(net: &Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(net.prefix_len()), net.network().octets())
}

fn range_key(id: u32, net: &Ipv4Net) -> Key<SourceRangeKey> {
    Key::new(SourceRangeKey::prefix_len(net.prefix_len()), SourceRangeKey::new(id, net.network().octets()))
}

/// Deleting what is already gone is not an error (a restart may race).
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// The map has no room for another key: E2BIG from a hash map, ENOSPC
/// from an LPM trie.
fn is_full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)))
}

impl MapStore for Maps {
    fn apply(&mut self, op: &Op) -> Result<(), StoreError> {
        let written = match op {
            Op::PutConfig(c) => self.config.set(0, c, 0),
            Op::PutNodeAddr(a) => self.node_addrs.insert(a, &1, 0),
            Op::DelNodeAddr(a) => ignore_missing(self.node_addrs.remove(a)),
            Op::PutClusterIp(a) => self.cluster_ips.insert(a, &1, 0),
            Op::DelClusterIp(a) => ignore_missing(self.cluster_ips.remove(a)),
            Op::PutServiceCidr(n) => self.service_cidrs.insert(&cidr_key(n), &1, 0),
            Op::DelServiceCidr(n) => ignore_missing(self.service_cidrs.remove(&cidr_key(n))),
            Op::PutBackend(id, b) => self.backends.insert(id, b, 0),
            Op::DelBackend(id) => ignore_missing(self.backends.remove(id)),
            Op::PutSlot(k, b) => self.slots.insert(k, b, 0),
            Op::DelSlot(k) => ignore_missing(self.slots.remove(k)),
            Op::PutEndpoint(k) => self.endpoints.insert(k, &1, 0),
            Op::DelEndpoint(k) => ignore_missing(self.endpoints.remove(k)),
            Op::PutAffinityMatch(k) => self.affinity_match.insert(k, &1, 0),
            Op::DelAffinityMatch(k) => ignore_missing(self.affinity_match.remove(k)),
            Op::PutSourceRange(id, net) => self.source_ranges.insert(&range_key(*id, net), &1, 0),
            Op::DelSourceRange(id, net) => ignore_missing(self.source_ranges.remove(&range_key(*id, net))),
            Op::PutName(id, n) => self.names.insert(id, n, 0),
            Op::DelName(id) => ignore_missing(self.names.remove(id)),
            Op::ResetStats(id) => {
                let cpus = aya::util::nr_cpus().map_err(|(path, e)| StoreError::Write {
                    map: reg::SVC_STATS.name,
                    source: anyhow::anyhow!("reading {path}: {e}"),
                })?;
                PerCpuValues::try_from(vec![SvcStats::default(); cpus.get() as usize])
                    .map_err(MapError::from)
                    .and_then(|zeros| self.svc_stats.set(*id, zeros, 0))
            }
            Op::PutFrontend(k, v) => self.services.insert(k, v, 0),
            Op::DelFrontend(k) => ignore_missing(self.services.remove(k)),
        };
        written.map_err(|e| {
            let def = op.map();
            if is_full(&e) {
                let capacity = self.capacity(def).unwrap_or_else(|| def.capacity());
                StoreError::Full { map: def.name, capacity }
            } else {
                StoreError::Write { map: def.name, source: anyhow::Error::new(e).context(format!("{op:?}")) }
            }
        })
    }

    fn dump(&self) -> Result<Programmed, StoreError> {
        fn read<T>(map: &'static str, r: Result<T, MapError>) -> Result<T, StoreError> {
            r.map_err(|e| StoreError::Read { map, source: e.into() })
        }
        let mut p = Programmed {
            config: self.config.get(&0, 0).ok().filter(|c| *c != Config::default()),
            ..Default::default()
        };
        for a in self.node_addrs.keys() {
            p.node_addrs.insert(read(reg::NODE_ADDRS.name, a)?);
        }
        for a in self.cluster_ips.keys() {
            p.cluster_ips.insert(read(reg::CLUSTER_IPS.name, a)?);
        }
        for k in self.service_cidrs.keys() {
            let k = read(reg::SERVICE_CIDRS.name, k)?;
            if let Ok(net) = Ipv4Net::new(k.data().into(), k.prefix_len().min(32) as u8) {
                p.service_cidrs.insert(net);
            }
        }
        for e in self.backends.iter() {
            let (id, b) = read(reg::BACKENDS.name, e)?;
            p.backends.insert(id, b);
        }
        for e in self.slots.iter() {
            let (k, b) = read(reg::SLOTS.name, e)?;
            p.slots.insert(k, b);
        }
        for k in self.endpoints.keys() {
            p.endpoints.insert(read(reg::ENDPOINTS.name, k)?);
        }
        for k in self.affinity_match.keys() {
            p.affinity_match.insert(read(reg::AFFINITY_MATCH.name, k)?);
        }
        for k in self.source_ranges.keys() {
            let k = read(reg::SOURCE_RANGES.name, k)?;
            let data = k.data();
            let len = k.prefix_len().saturating_sub(32).min(32) as u8;
            if let Ok(net) = Ipv4Net::new(data.addr.into(), len) {
                p.source_ranges.insert((u32::from_be_bytes(data.frontend_id), net));
            }
        }
        for e in self.names.iter() {
            let (id, n) = read(reg::SERVICE_NAMES.name, e)?;
            p.names.insert(id, n);
        }
        for e in self.services.iter() {
            let (k, v) = read(reg::SERVICES.name, e)?;
            p.services.insert(k, v);
        }
        Ok(p)
    }

    fn capacity(&self, map: &MapDef) -> Option<u32> {
        Maps::capacity(self, map)
    }
}

fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::Array(d) | Map::HashMap(d) | Map::LpmTrie(d) | Map::LruHashMap(d) | Map::PerCpuArray(d) => {
            Some(d)
        }
        _ => None,
    }
}
