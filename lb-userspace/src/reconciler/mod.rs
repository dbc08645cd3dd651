//! Keeps the maps equal to the desired state, writing only the difference.
//!
//! `Reconciler::plan` is pure: from what it knows is programmed and what is
//! desired, it returns the map operations in a safe order and updates its
//! own record. `apply` carries them out on the maps; `adopt` rebuilds the
//! record from maps pinned by an earlier run, so a restarted agent changes
//! nothing that is already right.
//!
//! Order: backends before the slots that name them, slots before the
//! frontend count that exposes them, and deletes in reverse. A removed
//! backend's slot is refilled (with an addition, or the last slot) before
//! the count shrinks, so one endpoint change is O(1) writes.

pub mod keys;
pub mod store;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;
use lb_common::{
    AffinityMatchKey, Backend, Config, FrontendKind, Scope, ServiceName, SlotKey, config_flags,
    frontend_flags, registry,
};

pub use self::store::{MapStore, MemoryStore, Op, Programmed, StoreError};
use crate::{
    frontend::{BackendAddr, Frontend},
    model::{Desired, DesiredBackend, DesiredFrontend},
    sorted::diff,
};

/// Node-level settings the dataplane needs besides services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    /// NodePort frontends answer on these.
    pub addresses: BTreeSet<IpAddr>,
    /// Source address of flows SNATed toward remote backends.
    pub snat_addr: IpAddr,
    /// SNAT source ports, MIN..=MAX.
    pub nat_ports: (u16, u16),
    /// Hand translated packets to the host stack rather than redirect them.
    pub via_stack: bool,
    /// The service CIDRs (`--service-cidr`): the ClusterIP catch-all
    /// rejects unused ports of allocated ClusterIPs and drops the rest.
    pub service_cidrs: Vec<Ipv4Net>,
}

impl NodeSettings {
    fn config(&self) -> Result<Config> {
        Ok(Config {
            snat_addr: keys::ipv4(self.snat_addr)?,
            nat_port_min: self.nat_ports.0,
            nat_port_max: self.nat_ports.1,
            flags: if self.via_stack { config_flags::VIA_STACK } else { 0 },
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ProgrammedFrontend {
    value: lb_common::Frontend,
    name: Option<ServiceName>,
    /// Backend ids by slot.
    slots: Vec<u32>,
    members: BTreeSet<u32>,
    /// Backend ids of its endpoints, usable or standby (`lb_endpoints`).
    endpoints: BTreeSet<u32>,
    ranges: BTreeSet<Ipv4Net>,
    /// What was last applied (none after adoption): an equal desired
    /// frontend needs no work at all.
    desired: Option<Arc<DesiredFrontend>>,
}

/// The reconciler's record of what the maps hold.
#[derive(Debug, Default)]
pub struct Reconciler {
    frontends: BTreeMap<Frontend, ProgrammedFrontend>,
    backends: HashMap<BackendAddr, (u32, Backend)>,
    /// How many frontends name each backend (usable or standby).
    refs: HashMap<BackendAddr, u32>,
    /// Backends whose count may have dropped to zero (all of them after
    /// adoption): deleted at the end of the plan if nothing names them.
    maybe_stale: BTreeSet<BackendAddr>,
    node_addrs: BTreeSet<[u8; 4]>,
    cluster_ips: BTreeSet<[u8; 4]>,
    /// A frontend came, went or changed kind since `cluster_ips` was
    /// derived: only then does a plan walk the frontends for it.
    cluster_ips_stale: bool,
    /// Some backend has been one of this node's own addresses (a
    /// hostNetwork endpoint; `config_flags::HOST_ENDPOINTS`). It stays so,
    /// across restarts too, until `lb-agent reset`: TCP connections to such
    /// an endpoint outlive it, and their replies still need translating.
    host_endpoints: bool,
    service_cidrs: BTreeSet<Ipv4Net>,
    config: Option<Config>,
    next_backend_id: u32,
    free_frontend_ids: BTreeSet<u32>,
    next_frontend_id: u32,
    limits: Limits,
    /// Entries of the maps sized by the sum over frontends.
    used: Usage,
    /// Desired frontends the last plan left out: their maps are full.
    overflow: BTreeMap<Frontend, StoreError>,
}

/// The sizes of the maps the reconciler fills, so that a plan never asks
/// for more than they hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub frontends: usize,
    pub backends: usize,
    pub slots: usize,
    pub affinity_match: usize,
    pub source_ranges: usize,
    pub endpoints: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self::from_capacity(|m| m.capacity())
    }
}

impl Limits {
    /// Each map's size as `capacity` gives it.
    pub fn from_capacity(capacity: impl Fn(&registry::MapDef) -> u32) -> Self {
        let of = |m: &registry::MapDef| capacity(m) as usize;
        Self {
            // Frontend ids index the per-frontend counters; 0 is never used.
            frontends: of(&registry::SERVICES)
                .min(of(&registry::SERVICE_NAMES))
                .min(of(&registry::SVC_STATS).saturating_sub(1)),
            backends: of(&registry::BACKENDS),
            slots: of(&registry::SLOTS),
            affinity_match: of(&registry::AFFINITY_MATCH),
            endpoints: of(&registry::ENDPOINTS),
            source_ranges: of(&registry::SOURCE_RANGES),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Usage {
    slots: usize,
    members: usize,
    ranges: usize,
    endpoints: usize,
}

/// Counts of what is programmed, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub frontends: usize,
    pub backends: usize,
}

impl Reconciler {
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    pub fn with_limits(limits: Limits) -> Self {
        Self { next_backend_id: 1, next_frontend_id: 1, limits, ..Default::default() }
    }

    /// Desired frontends the last plan could not program, and why: a map
    /// that is full. They are planned again each time.
    pub fn overflow(&self) -> &BTreeMap<Frontend, StoreError> {
        &self.overflow
    }

    /// `Err` naming the full map if `fe` at `key` does not fit.
    fn room(&self, key: &Frontend, fe: &DesiredFrontend) -> Result<(), StoreError> {
        let full = |map: &'static registry::MapDef, capacity: usize| {
            Err(StoreError::Full { map: map.name, capacity: capacity as u32 })
        };
        let current = self.frontends.get(key);
        if current.is_none() && self.frontends.len() >= self.limits.frontends {
            return full(&registry::SERVICES, self.limits.frontends);
        }
        let new_backends: BTreeSet<BackendAddr> = fe
            .backends
            .iter()
            .chain(&fe.standby)
            .map(|b| backend_addr(b, key))
            .filter(|a| !self.backends.contains_key(a))
            .collect();
        if self.backends.len() + new_backends.len() > self.limits.backends {
            return full(&registry::BACKENDS, self.limits.backends);
        }
        let had = current.map_or(Usage::default(), |p| Usage {
            slots: p.slots.len(),
            members: p.members.len(),
            ranges: p.ranges.len(),
            ..Usage::default()
        });
        // Endpoints are added before the gone ones are deleted.
        let added_endpoints = refs_of(fe, key)
            .iter()
            .filter(|a| {
                let id = self.backends.get(a).map(|(id, _)| *id);
                !id.is_some_and(|id| current.is_some_and(|p| p.endpoints.contains(&id)))
            })
            .count();
        if self.used.endpoints + added_endpoints > self.limits.endpoints {
            return full(&registry::ENDPOINTS, self.limits.endpoints);
        }
        // Slots beyond the old count are written first and the rest later
        // deleted; affinity members and source ranges are added before the
        // gone ones are deleted: their peak is the current use plus what is new.
        if self.used.slots - had.slots + fe.backends.len().max(had.slots) > self.limits.slots {
            return full(&registry::SLOTS, self.limits.slots);
        }
        let member = |b: &DesiredBackend| {
            let id = self.backends.get(&backend_addr(b, key)).map(|(id, _)| *id);
            id.is_some_and(|id| current.is_some_and(|p| p.members.contains(&id)))
        };
        let added_members =
            if fe.affinity_timeout.is_some() { fe.backends.iter().filter(|b| !member(b)).count() } else { 0 };
        if self.used.members + added_members > self.limits.affinity_match {
            return full(&registry::AFFINITY_MATCH, self.limits.affinity_match);
        }
        let added_ranges =
            fe.source_ranges.iter().filter(|r| !current.is_some_and(|p| p.ranges.contains(r))).count();
        if self.used.ranges + added_ranges > self.limits.source_ranges {
            return full(&registry::SOURCE_RANGES, self.limits.source_ranges);
        }
        Ok(())
    }

    pub fn summary(&self) -> Summary {
        Summary { frontends: self.frontends.len(), backends: self.backends.len() }
    }

    /// What adopted maps lack or hold in excess: `lb_endpoints` for
    /// frontends that have slots but no endpoint entries (pins of an older
    /// version: their slots' backends), so that UDP flows keep their
    /// backends from the moment the new programs run, before the first
    /// sync completes the rest; and the entries of frontends that are gone
    /// (a run stopped between deleting a frontend and its endpoints).
    pub fn backfill(&mut self, maps: &Programmed) -> Vec<Op> {
        let ids: BTreeSet<u32> = self.frontends.values().map(|f| f.value.id).collect();
        let mut ops: Vec<Op> = maps
            .endpoints
            .iter()
            .filter(|k| !ids.contains(&k.frontend_id))
            .map(|k| Op::DelEndpoint(*k))
            .collect();
        for fe in self.frontends.values_mut().filter(|f| f.endpoints.is_empty()) {
            fe.endpoints = fe.slots.iter().copied().collect();
            let frontend_id = fe.value.id;
            ops.extend(
                fe.endpoints
                    .iter()
                    .map(|&backend_id| Op::PutEndpoint(AffinityMatchKey { frontend_id, backend_id })),
            );
            self.used.endpoints += fe.endpoints.len();
        }
        ops
    }

    /// Frontend id → the (address, port) of its endpoints (usable or not):
    /// a socket the hooks connected elsewhere points at a backend that left
    /// its Service, as a UDP flow of the packet path would (`lb_endpoints`).
    pub fn live_backends(&self) -> crate::socket_lb::LiveBackends {
        let by_id: HashMap<u32, &Backend> = self.backends.values().map(|(id, b)| (*id, b)).collect();
        self.frontends
            .values()
            .map(|f| {
                let live =
                    f.endpoints.iter().filter_map(|id| by_id.get(id)).map(|b| (b.addr, b.port)).collect();
                (f.value.id, live)
            })
            .collect()
    }

    fn alloc_frontend_id(&mut self) -> Result<u32> {
        if let Some(id) = self.free_frontend_ids.pop_first() {
            return Ok(id);
        }
        // Frontend ids index the per-frontend counters.
        let limit = registry::SVC_STATS.capacity();
        anyhow::ensure!(
            self.next_frontend_id < limit,
            "more than {} frontends: {} is full",
            limit - 1,
            registry::SVC_STATS.name
        );
        self.next_frontend_id += 1;
        Ok(self.next_frontend_id - 1)
    }

    /// The operations that turn the programmed state into `desired`.
    pub fn plan(&mut self, desired: &Desired, node: &NodeSettings) -> Result<Vec<Op>> {
        let mut ops = Vec::new();
        // (Written at the end, with what the plan finds; checked first.)
        let mut config = node.config()?;
        let addresses: BTreeSet<[u8; 4]> =
            node.addresses.iter().map(|a| keys::ipv4(*a)).collect::<Result<_, _>>()?;
        let addresses_changed = addresses != self.node_addrs;
        for addr in addresses.difference(&self.node_addrs) {
            ops.push(Op::PutNodeAddr(*addr));
        }
        // The catch-all's ranges first; its ClusterIPs at the end, those of
        // the frontends programmed (so they fit the map, sized as
        // lb_services): a new ClusterIP's other ports are dropped rather
        // than refused for the moment between.
        let service_cidrs: BTreeSet<Ipv4Net> = node.service_cidrs.iter().copied().collect();
        ops.extend(service_cidrs.difference(&self.service_cidrs).copied().map(Op::PutServiceCidr));

        // Only frontends that differ from what was last applied need work,
        // so one endpoint change costs that frontend, not the whole table.
        // Shared frontends compare by pointer first: unchanged ones are free.
        let mut changed: Vec<(Frontend, &Arc<DesiredFrontend>)> = Vec::new();
        let mut gone: Vec<Frontend> = Vec::new();
        diff(
            &self.frontends,
            &desired.frontends,
            |programmed, fe| programmed.desired.as_ref() == Some(fe),
            |key, _, fe| match fe {
                Some(fe) => changed.push((*key, fe)),
                None => gone.push(*key),
            },
        );
        // An internal twin is in place before the external frontend that
        // sends in-cluster clients to it.
        changed.sort_by_key(|(key, _)| key.scope != Scope::Internal);
        // And goes after it.
        gone.sort_by_key(|key| key.scope == Scope::Internal);

        // What does not fit waits, in a stable order (the maps' keys),
        // while everything that does is programmed.
        self.overflow.clear();
        for (key, fe) in changed {
            if let Err(full) = self.room(&key, fe) {
                self.overflow.insert(key, full);
                continue;
            }
            // An external frontend that sends in-cluster clients to its
            // internal twin waits for the twin.
            let twin = key.with_scope(Scope::Internal);
            if fe.two_scopes && key.scope == Scope::External && !self.frontends.contains_key(&twin) {
                let full = self.overflow.get(&twin).map(StoreError::to_string).unwrap_or_default();
                self.overflow.insert(key, StoreError::Twin(full));
                continue;
            }
            // Backends first: every endpoint the frontend names.
            for b in fe.backends.iter().chain(&fe.standby) {
                let addr = backend_addr(b, &key);
                let value = keys::backend_value(&addr, b.local)?;
                match self.backends.get_mut(&addr) {
                    Some((_, current)) if *current == value => {}
                    Some((id, current)) => {
                        ops.push(Op::PutBackend(*id, value));
                        *current = value;
                    }
                    None => {
                        let id = self.next_backend_id;
                        self.next_backend_id = self.next_backend_id.wrapping_add(1).max(1);
                        ops.push(Op::PutBackend(id, value));
                        self.backends.insert(addr, (id, value));
                    }
                }
            }
            let old = self.frontends.get(&key).and_then(|p| p.desired.as_ref()).map(|d| refs_of(d, &key));
            let new = refs_of(fe, &key);
            for k in new.difference(old.as_ref().unwrap_or(&BTreeSet::new())) {
                *self.refs.entry(*k).or_default() += 1;
            }
            for k in old.iter().flat_map(|o| o.difference(&new)) {
                self.unref(*k);
            }
            self.plan_frontend(key, fe, &mut ops)?;
        }

        // Then what is gone, in reverse: frontends, their slots, backends.
        for key in gone {
            self.cluster_ips_stale = true;
            let fe = self.frontends.remove(&key).expect("listed above");
            for k in fe.desired.iter().flat_map(|d| refs_of(d, &key)) {
                self.unref(k);
            }
            let id = fe.value.id;
            self.used.slots -= fe.slots.len();
            self.used.members -= fe.members.len();
            self.used.ranges -= fe.ranges.len();
            self.used.endpoints -= fe.endpoints.len();
            ops.push(Op::DelFrontend(keys::frontend_key(&key)?));
            if fe.name.is_some() {
                ops.push(Op::DelName(id));
            }
            for slot in 0..fe.slots.len() as u32 {
                ops.push(Op::DelSlot(SlotKey { frontend_id: id, slot }));
            }
            for backend_id in fe.members {
                ops.push(Op::DelAffinityMatch(AffinityMatchKey { frontend_id: id, backend_id }));
            }
            for backend_id in fe.endpoints {
                ops.push(Op::DelEndpoint(AffinityMatchKey { frontend_id: id, backend_id }));
            }
            for range in fe.ranges {
                ops.push(Op::DelSourceRange(id, range));
            }
            self.free_frontend_ids.insert(id);
        }
        // Adopted frontends still waiting for room keep serving with the
        // backends their slots name.
        let waiting: BTreeSet<u32> = self
            .frontends
            .values()
            .filter(|p| p.desired.is_none())
            .flat_map(|p| p.slots.iter().copied())
            .collect();
        for addr in std::mem::take(&mut self.maybe_stale) {
            if self.backends.get(&addr).is_some_and(|(id, _)| waiting.contains(id)) {
                self.maybe_stale.insert(addr);
                continue;
            }
            if self.refs.get(&addr).copied().unwrap_or(0) == 0 {
                self.refs.remove(&addr);
                if let Some((id, _)) = self.backends.remove(&addr) {
                    ops.push(Op::DelBackend(id));
                }
            }
        }
        let old_addrs: Vec<[u8; 4]> = self.node_addrs.difference(&addresses).copied().collect();
        ops.extend(old_addrs.into_iter().map(Op::DelNodeAddr));
        self.node_addrs = addresses;
        if std::mem::take(&mut self.cluster_ips_stale) {
            let cluster_ips: BTreeSet<[u8; 4]> = self
                .frontends
                .iter()
                .filter(|(_, f)| f.value.kind == FrontendKind::ClusterIp as u8)
                .filter_map(|(k, _)| keys::ipv4(k.ip).ok())
                .collect();
            ops.extend(cluster_ips.difference(&self.cluster_ips).copied().map(Op::PutClusterIp));
            ops.extend(self.cluster_ips.difference(&cluster_ips).copied().map(Op::DelClusterIp));
            self.cluster_ips = cluster_ips;
        }
        ops.extend(self.service_cidrs.difference(&service_cidrs).copied().map(Op::DelServiceCidr));
        self.service_cidrs = service_cidrs;

        let backends_added = ops.iter().any(|op| matches!(op, Op::PutBackend(..)));
        if !self.host_endpoints && (backends_added || addresses_changed) {
            let on_node = |b: &BackendAddr| keys::ipv4(b.ip).is_ok_and(|a| self.node_addrs.contains(&a));
            self.host_endpoints = self.backends.keys().any(on_node);
        }
        if self.host_endpoints {
            config.flags |= config_flags::HOST_ENDPOINTS;
        }
        if self.config != Some(config) {
            // First: the SNAT address and the egress program's switch are
            // in place before the flows that need them.
            ops.insert(0, Op::PutConfig(config));
            self.config = Some(config);
        }
        Ok(ops)
    }

    fn unref(&mut self, addr: BackendAddr) {
        if let Some(n) = self.refs.get_mut(&addr) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.maybe_stale.insert(addr);
            }
        }
    }

    fn plan_frontend(&mut self, key: Frontend, fe: &Arc<DesiredFrontend>, ops: &mut Vec<Op>) -> Result<()> {
        let kernel_key = keys::frontend_key(&key)?;
        let want: Vec<u32> = fe.backends.iter().map(|b| self.backends[&backend_addr(b, &key)].0).collect();
        let affinity = fe.affinity_timeout.is_some();
        let mut flags = 0;
        if affinity {
            flags |= frontend_flags::AFFINITY;
        }
        if !fe.source_ranges.is_empty() {
            flags |= frontend_flags::SOURCE_RANGES;
        }
        if fe.local_only {
            flags |= frontend_flags::LOCAL_ONLY;
        }
        if fe.two_scopes {
            flags |= frontend_flags::TWO_SCOPES;
        }
        let want_members: BTreeSet<u32> =
            if affinity { want.iter().copied().collect() } else { BTreeSet::new() };
        let want_endpoints: BTreeSet<u32> = refs_of(fe, &key).iter().map(|a| self.backends[a].0).collect();
        let want_ranges: BTreeSet<Ipv4Net> = fe.source_ranges.iter().copied().collect();
        let (namespace, name) = fe.service.split_once('/').unwrap_or(("", &fe.service));
        let want_name = ServiceName::new(namespace, name, &fe.port_name);

        let (is_new, mut current) = match self.frontends.remove(&key) {
            Some(current) => (false, current),
            None => {
                let id = self.alloc_frontend_id()?;
                let value = lb_common::Frontend { id, ..Default::default() };
                (true, ProgrammedFrontend { value, ..Default::default() })
            }
        };
        let id = current.value.id;
        if is_new {
            // A reused id must not inherit an earlier frontend's counters.
            ops.push(Op::ResetStats(id));
        }
        // Affinity members that leave go before anything can pick them.
        for gone in current.members.difference(&want_members) {
            ops.push(Op::DelAffinityMatch(AffinityMatchKey { frontend_id: id, backend_id: *gone }));
        }
        for added in want_endpoints.difference(&current.endpoints) {
            ops.push(Op::PutEndpoint(AffinityMatchKey { frontend_id: id, backend_id: *added }));
        }

        let slots = rearrange(&current.slots, &want);
        let (old_len, new_len) = (current.slots.len(), slots.len());
        // Tail slots first (invisible until the count grows), then refills.
        for (i, b) in slots.iter().enumerate().skip(old_len) {
            ops.push(Op::PutSlot(SlotKey { frontend_id: id, slot: i as u32 }, *b));
        }
        for (i, (old, new)) in current.slots.iter().zip(&slots).enumerate() {
            if old != new {
                ops.push(Op::PutSlot(SlotKey { frontend_id: id, slot: i as u32 }, *new));
            }
        }
        for added in want_members.difference(&current.members) {
            ops.push(Op::PutAffinityMatch(AffinityMatchKey { frontend_id: id, backend_id: *added }));
        }
        for added in want_ranges.difference(&current.ranges) {
            ops.push(Op::PutSourceRange(id, *added));
        }
        if current.name != Some(want_name) {
            ops.push(Op::PutName(id, want_name));
        }

        let value = lb_common::Frontend {
            id,
            backend_count: new_len as u32,
            affinity_timeout: fe.affinity_timeout.unwrap_or(0),
            kind: fe.kind as u8,
            flags,
            _pad: 0,
        };
        if is_new || value != current.value {
            ops.push(Op::PutFrontend(kernel_key, value));
        }
        self.cluster_ips_stale |= is_new || value.kind != current.value.kind;
        for slot in new_len..old_len {
            ops.push(Op::DelSlot(SlotKey { frontend_id: id, slot: slot as u32 }));
        }
        for gone in current.ranges.difference(&want_ranges) {
            ops.push(Op::DelSourceRange(id, *gone));
        }
        // Endpoints that leave go once no slot names them: their UDP flows
        // then choose again among the ones left.
        for gone in current.endpoints.difference(&want_endpoints) {
            ops.push(Op::DelEndpoint(AffinityMatchKey { frontend_id: id, backend_id: *gone }));
        }
        self.used.slots = self.used.slots - old_len + new_len;
        self.used.members = self.used.members - current.members.len() + want_members.len();
        self.used.ranges = self.used.ranges - current.ranges.len() + want_ranges.len();
        self.used.endpoints = self.used.endpoints - current.endpoints.len() + want_endpoints.len();
        current.value = value;
        current.name = Some(want_name);
        current.slots = slots;
        current.members = want_members;
        current.endpoints = want_endpoints;
        current.ranges = want_ranges;
        current.desired = Some(fe.clone());
        self.frontends.insert(key, current);
        Ok(())
    }

    /// Rebuilds the record from the maps' contents (pinned by an earlier run).
    pub fn adopt(maps: &Programmed) -> Result<Self> {
        Self::adopt_with(maps, Limits::default())
    }

    pub fn adopt_with(maps: &Programmed, limits: Limits) -> Result<Self> {
        let mut r = Self::with_limits(limits);
        for (id, b) in &maps.backends {
            let Some((addr, _)) = keys::backend_of(b) else { continue };
            r.backends.insert(addr, (*id, *b));
            // Nothing names it yet: the first plan keeps it only if something does.
            r.maybe_stale.insert(addr);
            r.next_backend_id = r.next_backend_id.max(id.wrapping_add(1).max(1));
        }
        let mut members: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for k in &maps.affinity_match {
            members.entry(k.frontend_id).or_default().insert(k.backend_id);
        }
        let mut endpoints: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for k in &maps.endpoints {
            endpoints.entry(k.frontend_id).or_default().insert(k.backend_id);
        }
        let mut ranges: BTreeMap<u32, BTreeSet<Ipv4Net>> = BTreeMap::new();
        for (id, net) in &maps.source_ranges {
            ranges.entry(*id).or_default().insert(*net);
        }
        let mut used_ids = BTreeSet::new();
        for (key, value) in &maps.services {
            let Some(frontend) = keys::frontend_of(key) else { continue };
            let mut slots = Vec::with_capacity(value.backend_count as usize);
            for slot in 0..value.backend_count {
                let b = maps
                    .slots
                    .get(&SlotKey { frontend_id: value.id, slot })
                    .with_context(|| format!("frontend {} lacks slot {slot}", value.id))?;
                slots.push(*b);
            }
            used_ids.insert(value.id);
            r.used.slots += slots.len();
            let fe = ProgrammedFrontend {
                value: *value,
                name: maps.names.get(&value.id).copied(),
                slots,
                members: members.remove(&value.id).unwrap_or_default(),
                endpoints: endpoints.remove(&value.id).unwrap_or_default(),
                ranges: ranges.remove(&value.id).unwrap_or_default(),
                desired: None,
            };
            r.used.members += fe.members.len();
            r.used.endpoints += fe.endpoints.len();
            r.used.ranges += fe.ranges.len();
            r.frontends.insert(frontend, fe);
        }
        r.next_frontend_id = used_ids.last().map_or(1, |max| max + 1);
        r.free_frontend_ids = (1..r.next_frontend_id).filter(|id| !used_ids.contains(id)).collect();
        r.node_addrs = maps.node_addrs.clone();
        r.cluster_ips = maps.cluster_ips.clone();
        r.cluster_ips_stale = true;
        r.service_cidrs = maps.service_cidrs.clone();
        r.config = maps.config.filter(|c| *c != Config::default());
        r.host_endpoints = r.config.is_some_and(|c| c.flags & config_flags::HOST_ENDPOINTS != 0);
        Ok(r)
    }
}

fn backend_addr(b: &DesiredBackend, frontend: &Frontend) -> BackendAddr {
    BackendAddr { ip: b.addr, port: b.port, l4: frontend.l4 }
}

/// The backends a frontend names, usable or standby.
fn refs_of(fe: &DesiredFrontend, key: &Frontend) -> BTreeSet<BackendAddr> {
    fe.backends.iter().chain(&fe.standby).map(|b| backend_addr(b, key)).collect()
}

/// New slot contents for `want`, moving as few slots as possible: backends
/// that stay keep their slot; a hole is refilled by an addition or by the
/// last slot.
fn rearrange(old: &[u32], want: &[u32]) -> Vec<u32> {
    let wanted: BTreeSet<u32> = want.iter().copied().collect();
    let present: BTreeSet<u32> = old.iter().copied().collect();
    let mut adds = want.iter().copied().filter(|b| !present.contains(b));
    let mut slots = old.to_vec();
    let mut i = 0;
    while i < slots.len() {
        if wanted.contains(&slots[i]) {
            i += 1;
        } else if let Some(add) = adds.next() {
            slots[i] = add;
            i += 1;
        } else {
            let last = slots.pop().expect("i < len");
            if i < slots.len() {
                slots[i] = last; // checked again on the next turn
            }
        }
    }
    slots.extend(adds);
    slots
}

/// Carries out `ops` in order. Stops at the first failure: the caller then
/// re-adopts from the maps and plans again.
pub fn apply(store: &mut impl MapStore, ops: &[Op]) -> Result<(), StoreError> {
    ops.iter().try_for_each(|op| store.apply(op))
}

#[cfg(test)]
mod tests;
