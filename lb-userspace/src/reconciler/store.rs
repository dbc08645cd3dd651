//! Where the reconciler's writes go: the programmed maps behind a trait,
//! one put or delete per `Op`, and a dump of what they hold. `maps::Maps`
//! is the kernel's implementation; `MemoryStore` keeps the same entries in
//! memory, so planning, adoption and pruning are tested without root.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use lb_common::{
    AffinityMatchKey, Backend, Config, Frontend, FrontendKey, FrontendKind, L4, Scope, ServiceName, SlotKey,
    backend_flags, frontend_flags,
    registry::{self as reg, MapDef, Size},
};

/// One write to the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutConfig(Config),
    PutNodeAddr([u8; 4]),
    DelNodeAddr([u8; 4]),
    PutClusterIp([u8; 4]),
    DelClusterIp([u8; 4]),
    PutServiceCidr(Ipv4Net),
    DelServiceCidr(Ipv4Net),
    PutBackend(u32, Backend),
    DelBackend(u32),
    PutSlot(SlotKey, u32),
    DelSlot(SlotKey),
    PutEndpoint(AffinityMatchKey),
    DelEndpoint(AffinityMatchKey),
    PutAffinityMatch(AffinityMatchKey),
    DelAffinityMatch(AffinityMatchKey),
    PutSourceRange(u32, Ipv4Net),
    DelSourceRange(u32, Ipv4Net),
    PutName(u32, ServiceName),
    DelName(u32),
    ResetStats(u32),
    PutFrontend(FrontendKey, Frontend),
    DelFrontend(FrontendKey),
}

impl Op {
    /// The map this op writes.
    pub fn map(&self) -> &'static MapDef {
        match self {
            Op::PutConfig(_) => &reg::CONFIG,
            Op::PutNodeAddr(_) | Op::DelNodeAddr(_) => &reg::NODE_ADDRS,
            Op::PutClusterIp(_) | Op::DelClusterIp(_) => &reg::CLUSTER_IPS,
            Op::PutServiceCidr(_) | Op::DelServiceCidr(_) => &reg::SERVICE_CIDRS,
            Op::PutBackend(..) | Op::DelBackend(_) => &reg::BACKENDS,
            Op::PutSlot(..) | Op::DelSlot(_) => &reg::SLOTS,
            Op::PutEndpoint(_) | Op::DelEndpoint(_) => &reg::ENDPOINTS,
            Op::PutAffinityMatch(_) | Op::DelAffinityMatch(_) => &reg::AFFINITY_MATCH,
            Op::PutSourceRange(..) | Op::DelSourceRange(..) => &reg::SOURCE_RANGES,
            Op::PutName(..) | Op::DelName(_) => &reg::SERVICE_NAMES,
            Op::ResetStats(_) => &reg::SVC_STATS,
            Op::PutFrontend(..) | Op::DelFrontend(_) => &reg::SERVICES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("map {map} is full ({capacity} entries){}", raise_hint(map))]
    Full { map: &'static str, capacity: u32 },
    /// An external frontend whose internal twin (for in-cluster clients)
    /// is not programmed: without it pods would get no translation.
    #[error("waits for its internal twin: {0}")]
    Twin(String),
    #[error("writing {map}: {source}")]
    Write {
        map: &'static str,
        #[source]
        source: anyhow::Error,
    },
    #[error("reading {map}: {source}")]
    Read {
        map: &'static str,
        #[source]
        source: anyhow::Error,
    },
}

fn raise_hint(map: &str) -> String {
    match reg::map(map).map(|m| m.size) {
        Some(Size::Flag { flag, .. }) => format!(": raise --{flag}"),
        _ => String::new(),
    }
}

/// The programmed maps.
pub trait MapStore {
    fn apply(&mut self, op: &Op) -> Result<(), StoreError>;
    /// Everything the programmed maps hold (`registry::MapDef::programmed`).
    fn dump(&self) -> Result<Programmed, StoreError>;
    /// How many entries `map` holds at most.
    fn capacity(&self, map: &MapDef) -> Option<u32>;
}

/// The contents of the programmed maps, as kernel keys and values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    pub config: Option<Config>,
    pub node_addrs: BTreeSet<[u8; 4]>,
    pub cluster_ips: BTreeSet<[u8; 4]>,
    pub service_cidrs: BTreeSet<Ipv4Net>,
    pub backends: BTreeMap<u32, Backend>,
    pub slots: BTreeMap<SlotKey, u32>,
    /// (frontend id, backend id): the frontends' endpoints.
    pub endpoints: BTreeSet<AffinityMatchKey>,
    pub affinity_match: BTreeSet<AffinityMatchKey>,
    /// (frontend id, client prefix).
    pub source_ranges: BTreeSet<(u32, Ipv4Net)>,
    pub names: BTreeMap<u32, ServiceName>,
    pub services: BTreeMap<FrontendKey, Frontend>,
}

impl Programmed {
    /// Carries `op` out on these entries, as the kernel maps would.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::PutConfig(c) => self.config = Some(*c),
            Op::PutNodeAddr(a) => drop(self.node_addrs.insert(*a)),
            Op::DelNodeAddr(a) => drop(self.node_addrs.remove(a)),
            Op::PutClusterIp(a) => drop(self.cluster_ips.insert(*a)),
            Op::DelClusterIp(a) => drop(self.cluster_ips.remove(a)),
            Op::PutServiceCidr(n) => drop(self.service_cidrs.insert(*n)),
            Op::DelServiceCidr(n) => drop(self.service_cidrs.remove(n)),
            Op::PutBackend(id, b) => drop(self.backends.insert(*id, *b)),
            Op::DelBackend(id) => drop(self.backends.remove(id)),
            Op::PutSlot(k, b) => drop(self.slots.insert(*k, *b)),
            Op::DelSlot(k) => drop(self.slots.remove(k)),
            Op::PutEndpoint(k) => drop(self.endpoints.insert(*k)),
            Op::DelEndpoint(k) => drop(self.endpoints.remove(k)),
            Op::PutAffinityMatch(k) => drop(self.affinity_match.insert(*k)),
            Op::DelAffinityMatch(k) => drop(self.affinity_match.remove(k)),
            Op::PutSourceRange(id, net) => drop(self.source_ranges.insert((*id, *net))),
            Op::DelSourceRange(id, net) => drop(self.source_ranges.remove(&(*id, *net))),
            Op::PutName(id, n) => drop(self.names.insert(*id, *n)),
            Op::DelName(id) => drop(self.names.remove(id)),
            Op::ResetStats(_) => {}
            Op::PutFrontend(k, v) => drop(self.services.insert(*k, *v)),
            Op::DelFrontend(k) => drop(self.services.remove(k)),
        }
    }

    /// Entries of `map` (for capacity checks).
    pub fn len(&self, map: &MapDef) -> usize {
        match map.name {
            n if n == reg::CONFIG.name => usize::from(self.config.is_some()),
            n if n == reg::NODE_ADDRS.name => self.node_addrs.len(),
            n if n == reg::CLUSTER_IPS.name => self.cluster_ips.len(),
            n if n == reg::SERVICE_CIDRS.name => self.service_cidrs.len(),
            n if n == reg::BACKENDS.name => self.backends.len(),
            n if n == reg::SLOTS.name => self.slots.len(),
            n if n == reg::ENDPOINTS.name => self.endpoints.len(),
            n if n == reg::AFFINITY_MATCH.name => self.affinity_match.len(),
            n if n == reg::SOURCE_RANGES.name => self.source_ranges.len(),
            n if n == reg::SERVICE_NAMES.name => self.names.len(),
            n if n == reg::SERVICES.name => self.services.len(),
            _ => 0,
        }
    }

    /// A stable, readable dump: one line per entry, map by map (golden files).
    pub fn dump(&self) -> String {
        let mut out = String::new();
        let ip = |a: [u8; 4]| Ipv4Addr::from(a);
        if let Some(c) = &self.config {
            let _ = writeln!(
                out,
                "lb_config snat={} ports={}-{}",
                ip(c.snat_addr),
                c.nat_port_min,
                c.nat_port_max
            );
        }
        for a in &self.node_addrs {
            let _ = writeln!(out, "lb_node_addrs {}", ip(*a));
        }
        for n in &self.service_cidrs {
            let _ = writeln!(out, "lb_svc_cidrs {n}");
        }
        for a in &self.cluster_ips {
            let _ = writeln!(out, "lb_cluster_ips {}", ip(*a));
        }
        for (k, v) in &self.services {
            let addr = if k.addr == [0; 4] { "*".to_string() } else { ip(k.addr).to_string() };
            let l4 = L4::from_proto(k.proto).map_or("?", L4::name);
            let scope = Scope::from_u8(k.scope).map_or("?", Scope::name);
            let kind = FrontendKind::from_u8(v.kind).map_or("?", FrontendKind::as_str);
            let _ = write!(
                out,
                "lb_services {addr}:{}/{l4} {scope} -> id={} count={} kind={kind}",
                k.port, v.id, v.backend_count
            );
            let flags = frontend_flag_names(v.flags);
            if !flags.is_empty() {
                let _ = write!(out, " flags={}", flags.join(","));
            }
            if v.flags & frontend_flags::AFFINITY != 0 {
                let _ = write!(out, " affinity={}s", v.affinity_timeout);
            }
            out.push('\n');
        }
        for (id, n) in &self.names {
            let _ = writeln!(out, "lb_svc_names {id} -> {}/{} port={:?}", n.namespace(), n.name(), n.port());
        }
        for (k, b) in &self.slots {
            let _ = writeln!(out, "lb_slots {}/{} -> {b}", k.frontend_id, k.slot);
        }
        for (id, b) in &self.backends {
            let l4 = L4::from_proto(b.proto).map_or("?", L4::name);
            let local = if b.flags & backend_flags::LOCAL != 0 { " local" } else { "" };
            let _ = writeln!(out, "lb_backends {id} -> {}:{}/{l4}{local}", ip(b.addr), b.port);
        }
        for k in &self.endpoints {
            let _ = writeln!(out, "lb_endpoints {}/{}", k.frontend_id, k.backend_id);
        }
        for k in &self.affinity_match {
            let _ = writeln!(out, "lb_aff_match {}/{}", k.frontend_id, k.backend_id);
        }
        for (id, net) in &self.source_ranges {
            let _ = writeln!(out, "lb_src_ranges {id} {net}");
        }
        out
    }
}

/// The names of `frontend_flags` bits.
pub fn frontend_flag_names(flags: u8) -> Vec<&'static str> {
    [
        (frontend_flags::AFFINITY, "affinity"),
        (frontend_flags::SOURCE_RANGES, "source-ranges"),
        (frontend_flags::LOCAL_ONLY, "local-only"),
        (frontend_flags::TWO_SCOPES, "two-scopes"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

/// The programmed maps kept in memory, with the kernel maps' capacities.
#[derive(Clone, Debug)]
pub struct MemoryStore {
    pub maps: Programmed,
    capacities: BTreeMap<&'static str, usize>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_capacities(&[])
    }
}

impl MemoryStore {
    /// Registry capacities, except those given here.
    pub fn with_capacities(overrides: &[(&MapDef, usize)]) -> Self {
        let mut capacities: BTreeMap<_, _> =
            reg::MAPS.iter().map(|m| (m.name, m.capacity() as usize)).collect();
        for (m, n) in overrides {
            capacities.insert(m.name, *n);
        }
        Self { maps: Programmed::default(), capacities }
    }

    fn is_new_entry(&self, op: &Op) -> bool {
        let m = &self.maps;
        match op {
            Op::PutNodeAddr(a) => !m.node_addrs.contains(a),
            Op::PutClusterIp(a) => !m.cluster_ips.contains(a),
            Op::PutServiceCidr(n) => !m.service_cidrs.contains(n),
            Op::PutBackend(id, _) => !m.backends.contains_key(id),
            Op::PutSlot(k, _) => !m.slots.contains_key(k),
            Op::PutEndpoint(k) => !m.endpoints.contains(k),
            Op::PutAffinityMatch(k) => !m.affinity_match.contains(k),
            Op::PutSourceRange(id, net) => !m.source_ranges.contains(&(*id, *net)),
            Op::PutName(id, _) => !m.names.contains_key(id),
            Op::PutFrontend(k, _) => !m.services.contains_key(k),
            _ => false,
        }
    }
}

impl MapStore for MemoryStore {
    fn apply(&mut self, op: &Op) -> Result<(), StoreError> {
        let map = op.map();
        let capacity = self.capacities.get(map.name).copied().unwrap_or(usize::MAX);
        if self.is_new_entry(op) && self.maps.len(map) >= capacity {
            return Err(StoreError::Full { map: map.name, capacity: capacity as u32 });
        }
        self.maps.apply(op);
        Ok(())
    }

    fn dump(&self) -> Result<Programmed, StoreError> {
        Ok(self.maps.clone())
    }

    fn capacity(&self, map: &MapDef) -> Option<u32> {
        self.capacities.get(map.name).map(|n| *n as u32)
    }
}
