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

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use anyhow::{Context as _, Result};
use aya::maps::{MapError, PerCpuValues, lpm_trie::Key};
use ipnet::Ipv4Net;
use lb_common::{
    AffinityMatchKey, Backend, Config, Frontend, FrontendKey, SlotKey, SourceRangeKey, SvcStats,
    backend_flags, capacity, frontend_flags,
};

use crate::{
    maps::Maps,
    model::{Desired, DesiredBackend, DesiredFrontend},
    sorted::diff,
};

/// One write to the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutConfig(Config),
    PutNodeAddr([u8; 4]),
    DelNodeAddr([u8; 4]),
    PutBackend(u32, Backend),
    DelBackend(u32),
    PutSlot(SlotKey, u32),
    DelSlot(SlotKey),
    PutAffinityMatch(AffinityMatchKey),
    DelAffinityMatch(AffinityMatchKey),
    PutSourceRange(u32, Ipv4Net),
    DelSourceRange(u32, Ipv4Net),
    ResetStats(u32),
    PutFrontend(FrontendKey, Frontend),
    DelFrontend(FrontendKey),
}

/// Node-level settings the dataplane needs besides services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    pub addresses: BTreeSet<[u8; 4]>,
    pub config: Config,
}

/// A backend's identity: the same pod address and port is one backend for
/// every service that uses it.
type BackendKey = ([u8; 4], u16, u8);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ProgrammedFrontend {
    value: Frontend,
    /// Backend ids by slot.
    slots: Vec<u32>,
    members: BTreeSet<u32>,
    ranges: BTreeSet<Ipv4Net>,
    /// What was last applied (none after adoption): an equal desired
    /// frontend needs no work at all.
    desired: Option<Arc<DesiredFrontend>>,
}

/// The reconciler's record of what the maps hold.
#[derive(Debug, Default)]
pub struct Reconciler {
    frontends: BTreeMap<FrontendKey, ProgrammedFrontend>,
    backends: HashMap<BackendKey, (u32, Backend)>,
    /// How many frontends name each backend (usable or standby).
    refs: HashMap<BackendKey, u32>,
    /// Backends whose count may have dropped to zero (all of them after
    /// adoption): deleted at the end of the plan if nothing names them.
    maybe_stale: BTreeSet<BackendKey>,
    node_addrs: BTreeSet<[u8; 4]>,
    config: Option<Config>,
    next_backend_id: u32,
    free_frontend_ids: BTreeSet<u32>,
    next_frontend_id: u32,
}

/// Counts of what is programmed, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub frontends: usize,
    pub backends: usize,
}

impl Reconciler {
    pub fn new() -> Self {
        Self { next_backend_id: 1, next_frontend_id: 1, ..Default::default() }
    }

    pub fn summary(&self) -> Summary {
        Summary { frontends: self.frontends.len(), backends: self.backends.len() }
    }

    fn alloc_frontend_id(&mut self) -> Result<u32> {
        if let Some(id) = self.free_frontend_ids.pop_first() {
            return Ok(id);
        }
        anyhow::ensure!(
            self.next_frontend_id < capacity::SVC_STATS,
            "more than {} frontends: the counters map is full",
            capacity::SVC_STATS - 1
        );
        self.next_frontend_id += 1;
        Ok(self.next_frontend_id - 1)
    }

    /// The operations that turn the programmed state into `desired`.
    pub fn plan(&mut self, desired: &Desired, node: &NodeSettings) -> Result<Vec<Op>> {
        let mut ops = Vec::new();
        if self.config != Some(node.config) {
            ops.push(Op::PutConfig(node.config));
            self.config = Some(node.config);
        }
        for addr in node.addresses.difference(&self.node_addrs) {
            ops.push(Op::PutNodeAddr(*addr));
        }

        // Only frontends that differ from what was last applied need work,
        // so one endpoint change costs that frontend, not the whole table.
        // Shared frontends compare by pointer first: unchanged ones are free.
        let mut changed: Vec<(FrontendKey, &Arc<DesiredFrontend>)> = Vec::new();
        let mut gone: Vec<FrontendKey> = Vec::new();
        diff(
            &self.frontends,
            &desired.frontends,
            |programmed, fe| programmed.desired.as_ref() == Some(fe),
            |key, _, fe| match fe {
                Some(fe) => changed.push((*key, fe)),
                None => gone.push(*key),
            },
        );

        // Backends first: every endpoint the changed frontends name.
        let mut named: BTreeMap<BackendKey, Backend> = BTreeMap::new();
        for (key, fe) in &changed {
            for b in fe.backends.iter().chain(&fe.standby) {
                named.insert(backend_key(b, key.proto), backend_value(b, key.proto));
            }
        }
        for (bk, value) in &named {
            match self.backends.get_mut(bk) {
                Some((_, current)) if current == value => {}
                Some((id, current)) => {
                    ops.push(Op::PutBackend(*id, *value));
                    *current = *value;
                }
                None => {
                    let id = self.next_backend_id;
                    self.next_backend_id = self.next_backend_id.wrapping_add(1).max(1);
                    ops.push(Op::PutBackend(id, *value));
                    self.backends.insert(*bk, (id, *value));
                }
            }
        }

        for (key, fe) in changed {
            let old =
                self.frontends.get(&key).and_then(|p| p.desired.as_ref()).map(|d| refs_of(d, key.proto));
            let new = refs_of(fe, key.proto);
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
            let fe = self.frontends.remove(&key).expect("listed above");
            for k in fe.desired.iter().flat_map(|d| refs_of(d, key.proto)) {
                self.unref(k);
            }
            let id = fe.value.id;
            ops.push(Op::DelFrontend(key));
            for slot in 0..fe.slots.len() as u32 {
                ops.push(Op::DelSlot(SlotKey { frontend_id: id, slot }));
            }
            for backend_id in fe.members {
                ops.push(Op::DelAffinityMatch(AffinityMatchKey { frontend_id: id, backend_id }));
            }
            for range in fe.ranges {
                ops.push(Op::DelSourceRange(id, range));
            }
            self.free_frontend_ids.insert(id);
        }
        for bk in std::mem::take(&mut self.maybe_stale) {
            if self.refs.get(&bk).copied().unwrap_or(0) == 0 {
                self.refs.remove(&bk);
                if let Some((id, _)) = self.backends.remove(&bk) {
                    ops.push(Op::DelBackend(id));
                }
            }
        }
        let old_addrs: Vec<[u8; 4]> = self.node_addrs.difference(&node.addresses).copied().collect();
        ops.extend(old_addrs.into_iter().map(Op::DelNodeAddr));
        self.node_addrs = node.addresses.clone();
        Ok(ops)
    }

    fn unref(&mut self, bk: BackendKey) {
        if let Some(n) = self.refs.get_mut(&bk) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.maybe_stale.insert(bk);
            }
        }
    }

    fn plan_frontend(
        &mut self,
        key: FrontendKey,
        fe: &Arc<DesiredFrontend>,
        ops: &mut Vec<Op>,
    ) -> Result<()> {
        let want: Vec<u32> =
            fe.backends.iter().map(|b| self.backends[&backend_key(b, key.proto)].0).collect();
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
        let want_members: BTreeSet<u32> =
            if affinity { want.iter().copied().collect() } else { BTreeSet::new() };
        let want_ranges: BTreeSet<Ipv4Net> = fe.source_ranges.iter().copied().collect();

        let (is_new, mut current) = match self.frontends.remove(&key) {
            Some(current) => (false, current),
            None => {
                let id = self.alloc_frontend_id()?;
                let value = Frontend { id, ..Default::default() };
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

        let value = Frontend {
            id,
            backend_count: new_len as u32,
            affinity_timeout: fe.affinity_timeout.unwrap_or(0),
            kind: fe.kind as u8,
            flags,
            _pad: 0,
        };
        if is_new || value != current.value {
            ops.push(Op::PutFrontend(key, value));
        }
        for slot in new_len..old_len {
            ops.push(Op::DelSlot(SlotKey { frontend_id: id, slot: slot as u32 }));
        }
        for gone in current.ranges.difference(&want_ranges) {
            ops.push(Op::DelSourceRange(id, *gone));
        }
        current.value = value;
        current.slots = slots;
        current.members = want_members;
        current.ranges = want_ranges;
        current.desired = Some(fe.clone());
        self.frontends.insert(key, current);
        Ok(())
    }

    /// Rebuilds the record from the maps (pinned by an earlier run).
    pub fn adopt(maps: &Maps) -> Result<Self> {
        let mut r = Self::new();
        for entry in maps.backends.iter() {
            let (id, b) = entry.context("reading lb_backends")?;
            r.backends.insert((b.addr, b.port, b.proto), (id, b));
            // Nothing names it yet: the first plan keeps it only if something does.
            r.maybe_stale.insert((b.addr, b.port, b.proto));
            r.next_backend_id = r.next_backend_id.max(id.wrapping_add(1).max(1));
        }
        let mut members: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for entry in maps.affinity_match.keys() {
            let k = entry.context("reading lb_affinity_match")?;
            members.entry(k.frontend_id).or_default().insert(k.backend_id);
        }
        let mut ranges: BTreeMap<u32, BTreeSet<Ipv4Net>> = BTreeMap::new();
        for entry in maps.source_ranges.keys() {
            let k = entry.context("reading lb_source_ranges")?;
            let data = k.data();
            let len = (k.prefix_len().saturating_sub(32)).min(32) as u8;
            if let Ok(net) = Ipv4Net::new(data.addr.into(), len) {
                ranges.entry(u32::from_be_bytes(data.frontend_id)).or_default().insert(net);
            }
        }
        let mut used_ids = BTreeSet::new();
        for entry in maps.services.iter() {
            let (key, value) = entry.context("reading lb_services")?;
            let mut slots = Vec::with_capacity(value.backend_count as usize);
            for slot in 0..value.backend_count {
                let b = maps
                    .slots
                    .get(&SlotKey { frontend_id: value.id, slot }, 0)
                    .with_context(|| format!("frontend {} lacks slot {slot}", value.id))?;
                slots.push(b);
            }
            used_ids.insert(value.id);
            let fe = ProgrammedFrontend {
                value,
                slots,
                members: members.remove(&value.id).unwrap_or_default(),
                ranges: ranges.remove(&value.id).unwrap_or_default(),
                desired: None,
            };
            r.frontends.insert(key, fe);
        }
        r.next_frontend_id = used_ids.last().map_or(1, |max| max + 1);
        r.free_frontend_ids = (1..r.next_frontend_id).filter(|id| !used_ids.contains(id)).collect();
        for entry in maps.node_addrs.keys() {
            r.node_addrs.insert(entry.context("reading lb_node_addrs")?);
        }
        r.config = maps.config.get(&0, 0).ok().filter(|c| *c != Config::default());
        Ok(r)
    }
}

fn backend_key(b: &DesiredBackend, proto: u8) -> BackendKey {
    (b.addr.octets(), b.port, proto)
}

/// The backends a frontend names, usable or standby.
fn refs_of(fe: &DesiredFrontend, proto: u8) -> BTreeSet<BackendKey> {
    fe.backends.iter().chain(&fe.standby).map(|b| backend_key(b, proto)).collect()
}

fn backend_value(b: &DesiredBackend, proto: u8) -> Backend {
    Backend {
        addr: b.addr.octets(),
        port: b.port,
        proto,
        flags: if b.local { backend_flags::LOCAL } else { 0 },
    }
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
pub fn apply(maps: &mut Maps, ops: &[Op]) -> Result<()> {
    for op in ops {
        apply_one(maps, op).with_context(|| format!("applying {op:?}"))?;
    }
    Ok(())
}

fn apply_one(maps: &mut Maps, op: &Op) -> Result<()> {
    let written = match op {
        Op::PutConfig(c) => maps.config.set(0, c, 0),
        Op::PutNodeAddr(a) => maps.node_addrs.insert(a, &1, 0),
        Op::DelNodeAddr(a) => ignore_missing(maps.node_addrs.remove(a)),
        Op::PutBackend(id, b) => maps.backends.insert(id, b, 0),
        Op::DelBackend(id) => ignore_missing(maps.backends.remove(id)),
        Op::PutSlot(k, b) => maps.slots.insert(k, b, 0),
        Op::DelSlot(k) => ignore_missing(maps.slots.remove(k)),
        Op::PutAffinityMatch(k) => maps.affinity_match.insert(k, &1, 0),
        Op::DelAffinityMatch(k) => ignore_missing(maps.affinity_match.remove(k)),
        Op::PutSourceRange(id, net) => maps.source_ranges.insert(&range_key(*id, net), &1, 0),
        Op::DelSourceRange(id, net) => ignore_missing(maps.source_ranges.remove(&range_key(*id, net))),
        Op::ResetStats(id) => {
            let cpus = aya::util::nr_cpus().map_err(|(path, e)| anyhow::anyhow!("reading {path}: {e}"))?;
            let zeros = PerCpuValues::try_from(vec![SvcStats::default(); cpus.get() as usize])?;
            maps.svc_stats.set(*id, zeros, 0)
        }
        Op::PutFrontend(k, v) => maps.services.insert(k, v, 0),
        Op::DelFrontend(k) => ignore_missing(maps.services.remove(k)),
    };
    Ok(written?)
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

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use lb_common::{FrontendKind, IPPROTO_TCP};

    use super::*;

    fn node() -> NodeSettings {
        NodeSettings {
            addresses: [[192, 0, 2, 11]].into(),
            config: Config { snat_addr: [192, 0, 2, 11], nat_port_min: 61000, nat_port_max: 65535 },
        }
    }

    fn be(last: u8) -> DesiredBackend {
        DesiredBackend { addr: Ipv4Addr::new(10, 244, 1, last), port: 8080, local: true }
    }

    fn desired(backends: &[u8]) -> Desired {
        let mut d = Desired::default();
        d.frontends.insert(
            FrontendKey::new([10, 96, 0, 10], 80, IPPROTO_TCP),
            Arc::new(DesiredFrontend {
                service: "default/web".into(),
                port_name: String::new(),
                kind: FrontendKind::ClusterIp,
                backends: backends.iter().map(|b| be(*b)).collect(),
                standby: vec![],
                affinity_timeout: None,
                source_ranges: vec![],
                local_only: false,
            }),
        );
        d
    }

    fn position(ops: &[Op], pred: impl Fn(&Op) -> bool) -> usize {
        ops.iter().position(pred).expect("op present")
    }

    #[test]
    fn new_service_writes_backends_then_slots_then_frontend() {
        let mut r = Reconciler::new();
        let ops = r.plan(&desired(&[1, 2, 3]), &node()).unwrap();
        let last_backend = ops.iter().rposition(|o| matches!(o, Op::PutBackend(..))).unwrap();
        let first_slot = position(&ops, |o| matches!(o, Op::PutSlot(..)));
        let last_slot = ops.iter().rposition(|o| matches!(o, Op::PutSlot(..))).unwrap();
        let frontend = position(&ops, |o| matches!(o, Op::PutFrontend(..)));
        assert!(last_backend < first_slot && last_slot < frontend, "{ops:#?}");
        assert!(matches!(ops[frontend], Op::PutFrontend(_, Frontend { backend_count: 3, .. })));
        // The same state again changes nothing.
        assert_eq!(r.plan(&desired(&[1, 2, 3]), &node()).unwrap(), vec![]);
    }

    #[test]
    fn one_endpoint_change_is_a_handful_of_writes() {
        let many: Vec<u8> = (1..=100).collect();
        let mut r = Reconciler::new();
        r.plan(&desired(&many), &node()).unwrap();
        // Remove one backend in the middle: refill its slot from the tail,
        // shrink the count, drop the tail slot, delete the backend.
        let fewer: Vec<u8> = many.iter().copied().filter(|b| *b != 50).collect();
        let ops = r.plan(&desired(&fewer), &node()).unwrap();
        assert_eq!(ops.len(), 4, "{ops:#?}");
        let put = position(&ops, |o| matches!(o, Op::PutSlot(..)));
        let fe = position(&ops, |o| matches!(o, Op::PutFrontend(..)));
        let del = position(&ops, |o| matches!(o, Op::DelSlot(..)));
        let del_backend = position(&ops, |o| matches!(o, Op::DelBackend(..)));
        assert!(put < fe && fe < del && del < del_backend, "{ops:#?}");
        // Add one: a backend, a tail slot, the count.
        let ops = r.plan(&desired(&many), &node()).unwrap();
        assert_eq!(ops.len(), 3, "{ops:#?}");
    }

    #[test]
    fn removed_service_is_deleted_frontend_first_and_its_id_reused() {
        let mut r = Reconciler::new();
        let ops = r.plan(&desired(&[1, 2]), &node()).unwrap();
        let Some(Op::PutFrontend(_, fe)) = ops.iter().find(|o| matches!(o, Op::PutFrontend(..))) else {
            panic!()
        };
        let ops = r.plan(&Desired::default(), &node()).unwrap();
        assert!(matches!(ops[0], Op::DelFrontend(_)), "{ops:#?}");
        assert!(matches!(ops.last(), Some(Op::DelBackend(_))));
        assert_eq!(r.summary(), Summary::default());
        let ops = r.plan(&desired(&[3]), &node()).unwrap();
        assert!(ops.contains(&Op::ResetStats(fe.id)), "the freed id is reused with fresh counters");
    }

    #[test]
    fn a_shared_backend_stays_while_any_frontend_names_it() {
        let mut r = Reconciler::new();
        let mut both = desired(&[1, 2]);
        let mut second = (**both.frontends.values().next().unwrap()).clone();
        second.service = "default/other".into();
        both.frontends.insert(FrontendKey::new([10, 96, 0, 11], 80, IPPROTO_TCP), Arc::new(second.clone()));
        r.plan(&both, &node()).unwrap();
        assert_eq!(r.summary(), Summary { frontends: 2, backends: 2 });
        // The first frontend drops backend 2; the second still names it.
        let mut d = both.clone();
        Arc::make_mut(d.frontends.get_mut(&FrontendKey::new([10, 96, 0, 10], 80, IPPROTO_TCP)).unwrap())
            .backends
            .pop();
        let ops = r.plan(&d, &node()).unwrap();
        assert!(!ops.iter().any(|o| matches!(o, Op::DelBackend(_))), "{ops:#?}");
        // Now the second drops it too.
        Arc::make_mut(d.frontends.get_mut(&FrontendKey::new([10, 96, 0, 11], 80, IPPROTO_TCP)).unwrap())
            .backends
            .pop();
        let ops = r.plan(&d, &node()).unwrap();
        assert_eq!(ops.iter().filter(|o| matches!(o, Op::DelBackend(_))).count(), 1, "{ops:#?}");
        assert_eq!(r.summary().backends, 1);
    }

    #[test]
    fn rearrange_keeps_survivors_in_place() {
        assert_eq!(rearrange(&[1, 2, 3, 4], &[1, 2, 3, 4]), vec![1, 2, 3, 4]);
        assert_eq!(rearrange(&[1, 2, 3, 4], &[1, 3, 4]), vec![1, 4, 3]);
        assert_eq!(rearrange(&[1, 2, 3, 4], &[1, 3, 4, 9]), vec![1, 9, 3, 4]);
        assert_eq!(rearrange(&[1, 2, 3, 4], &[2]), vec![2]);
        assert_eq!(rearrange(&[1, 2, 3, 4], &[]), Vec::<u32>::new());
        assert_eq!(rearrange(&[], &[5, 6]), vec![5, 6]);
        assert_eq!(rearrange(&[1, 2, 3, 4], &[4, 3]), vec![4, 3]);
    }
}
