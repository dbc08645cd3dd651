use std::net::Ipv4Addr;

use lb_common::{FrontendKind, L4};
use proptest::prelude::*;

use super::*;

fn node() -> NodeSettings {
    let addr = IpAddr::from([192, 0, 2, 11]);
    NodeSettings {
        addresses: [addr].into(),
        snat_addr: addr,
        nat_ports: (61000, 65535),
        via_stack: false,
        service_cidrs: Vec::new(),
    }
}

fn be(last: u8) -> DesiredBackend {
    DesiredBackend { addr: Ipv4Addr::new(10, 244, 1, last).into(), port: 8080, local: true }
}

fn web() -> Frontend {
    Frontend::new(Ipv4Addr::new(10, 96, 0, 10), 80, L4::Tcp)
}

fn frontend(service: &str, backends: &[u8]) -> DesiredFrontend {
    DesiredFrontend::new(service, FrontendKind::ClusterIp, backends.iter().map(|b| be(*b)).collect())
}

fn desired(backends: &[u8]) -> Desired {
    let mut d = Desired::default();
    d.frontends.insert(web(), Arc::new(frontend("default/web", backends)));
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
    let name = position(&ops, |o| matches!(o, Op::PutName(..)));
    let frontend = position(&ops, |o| matches!(o, Op::PutFrontend(..)));
    assert!(last_backend < first_slot && last_slot < frontend && name < frontend, "{ops:#?}");
    assert!(matches!(ops[frontend], Op::PutFrontend(_, lb_common::Frontend { backend_count: 3, .. })));
    // The same state again changes nothing.
    assert_eq!(r.plan(&desired(&[1, 2, 3]), &node()).unwrap(), vec![]);
}

#[test]
fn one_endpoint_change_is_a_handful_of_writes() {
    let many: Vec<u8> = (1..=100).collect();
    let mut r = Reconciler::new();
    r.plan(&desired(&many), &node()).unwrap();
    // Remove one backend in the middle: refill its slot from the tail,
    // shrink the count, drop the tail slot, forget it as an endpoint (its
    // UDP flows then choose among the rest), delete the backend.
    let fewer: Vec<u8> = many.iter().copied().filter(|b| *b != 50).collect();
    let ops = r.plan(&desired(&fewer), &node()).unwrap();
    assert_eq!(ops.len(), 5, "{ops:#?}");
    let put = position(&ops, |o| matches!(o, Op::PutSlot(..)));
    let tail = position(&ops, |o| matches!(o, Op::DelSlot(..)));
    let forget = position(&ops, |o| matches!(o, Op::DelEndpoint(..)));
    assert!(tail < forget, "{ops:#?}");
    let fe = position(&ops, |o| matches!(o, Op::PutFrontend(..)));
    let del = position(&ops, |o| matches!(o, Op::DelSlot(..)));
    let del_backend = position(&ops, |o| matches!(o, Op::DelBackend(..)));
    assert!(put < fe && fe < del && del < del_backend, "{ops:#?}");
    // Add one: a backend, its endpoint entry, a tail slot, the count.
    let ops = r.plan(&desired(&many), &node()).unwrap();
    assert_eq!(ops.len(), 4, "{ops:#?}");
}

#[test]
fn the_egress_switch_is_on_before_a_host_endpoint_and_stays_on_after_it() {
    let host = |on: bool| {
        let mut d = desired(&[1]);
        if on {
            let mut fe = frontend("default/web", &[1]);
            fe.backends.push(DesiredBackend { addr: IpAddr::from([192, 0, 2, 11]), port: 8080, local: true });
            d.frontends.insert(web(), Arc::new(fe));
        }
        d
    };
    let flag = |op: &Op| matches!(op, Op::PutConfig(c) if c.flags & config_flags::HOST_ENDPOINTS != 0);
    let mut r = Reconciler::new();
    let ops = r.plan(&host(false), &node()).unwrap();
    assert!(!ops.iter().any(flag), "no host endpoint yet: {ops:#?}");
    let ops = r.plan(&host(true), &node()).unwrap();
    assert!(flag(&ops[0]), "on first: {ops:#?}");
    // Gone: its TCP connections may live on, and their replies still need
    // the egress program: the switch stays on, across adoption too.
    let ops = r.plan(&host(false), &node()).unwrap();
    assert!(!ops.iter().any(|o| matches!(o, Op::PutConfig(..))), "{ops:#?}");
    let mut store = MemoryStore::default();
    apply(&mut store, &Reconciler::new().plan(&host(true), &node()).unwrap()).unwrap();
    let mut adopted = Reconciler::adopt(&store.dump().unwrap()).unwrap();
    let ops = adopted.plan(&host(false), &node()).unwrap();
    assert!(!ops.iter().any(|o| matches!(o, Op::PutConfig(..))), "kept after adoption: {ops:#?}");
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
    assert!(ops.contains(&Op::DelName(fe.id)), "{ops:#?}");
    assert!(ops.iter().any(|o| matches!(o, Op::DelBackend(_))), "{ops:#?}");
    // The catch-all forgets the ClusterIP last: until then, its ports answer.
    assert!(matches!(ops.last(), Some(Op::DelClusterIp(_))), "{ops:#?}");
    assert_eq!(r.summary(), Summary::default());
    let ops = r.plan(&desired(&[3]), &node()).unwrap();
    assert!(ops.contains(&Op::ResetStats(fe.id)), "the freed id is reused with fresh counters");
}

#[test]
fn a_shared_backend_stays_while_any_frontend_names_it() {
    let mut r = Reconciler::new();
    let other = Frontend::new(Ipv4Addr::new(10, 96, 0, 11), 80, L4::Tcp);
    let mut both = desired(&[1, 2]);
    both.frontends.insert(other, Arc::new(frontend("default/other", &[1, 2])));
    r.plan(&both, &node()).unwrap();
    assert_eq!(r.summary(), Summary { frontends: 2, backends: 2 });
    // The first frontend drops backend 2; the second still names it.
    let mut d = both.clone();
    Arc::make_mut(d.frontends.get_mut(&web()).unwrap()).backends.pop();
    let ops = r.plan(&d, &node()).unwrap();
    assert!(!ops.iter().any(|o| matches!(o, Op::DelBackend(_))), "{ops:#?}");
    // Now the second drops it too.
    Arc::make_mut(d.frontends.get_mut(&other).unwrap()).backends.pop();
    let ops = r.plan(&d, &node()).unwrap();
    assert_eq!(ops.iter().filter(|o| matches!(o, Op::DelBackend(_))).count(), 1, "{ops:#?}");
    assert_eq!(r.summary().backends, 1);
}

#[test]
fn an_internal_twin_is_written_before_and_removed_after_its_external_frontend() {
    let external = Frontend::node_port(30080, L4::Tcp);
    let internal = external.with_scope(Scope::Internal);
    let mut d = Desired::default();
    let mut ext = frontend("default/web", &[1]);
    ext.kind = FrontendKind::NodePort;
    ext.two_scopes = true;
    d.frontends.insert(external, Arc::new(ext));
    d.frontends.insert(internal, Arc::new(frontend("default/web", &[1, 2])));
    let mut r = Reconciler::new();
    let ops = r.plan(&d, &node()).unwrap();
    let put = |scope: Scope| position(&ops, |o| matches!(o, Op::PutFrontend(k, _) if k.scope == scope as u8));
    assert!(put(Scope::Internal) < put(Scope::External), "{ops:#?}");
    let Op::PutFrontend(_, v) = &ops[put(Scope::External)] else { unreachable!() };
    assert_ne!(v.flags & frontend_flags::TWO_SCOPES, 0);
    let ops = r.plan(&Desired::default(), &node()).unwrap();
    let del = |scope: Scope| position(&ops, |o| matches!(o, Op::DelFrontend(k) if k.scope == scope as u8));
    assert!(del(Scope::External) < del(Scope::Internal), "{ops:#?}");
}

#[test]
fn adoption_of_what_was_applied_plans_nothing() {
    let mut store = MemoryStore::default();
    let mut d = desired(&[1, 2, 3]);
    let mut sticky = frontend("default/sticky", &[4, 5]);
    sticky.affinity_timeout = Some(60);
    sticky.source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
    d.frontends.insert(Frontend::node_port(30091, L4::Udp), Arc::new(sticky));
    let ops = Reconciler::new().plan(&d, &node()).unwrap();
    apply(&mut store, &ops).unwrap();
    let mut adopted = Reconciler::adopt(&store.dump().unwrap()).unwrap();
    assert_eq!(adopted.summary(), Summary { frontends: 2, backends: 5 });
    assert_eq!(adopted.plan(&d, &node()).unwrap(), vec![], "a restart rewrites nothing");
}

#[test]
fn a_full_map_is_reported_with_the_flag_that_sizes_it() {
    let mut store = MemoryStore::with_capacities(&[(&registry::SERVICES, 0)]);
    let ops = Reconciler::new().plan(&desired(&[1]), &node()).unwrap();
    let err = apply(&mut store, &ops).unwrap_err().to_string();
    assert_eq!(err, "map lb_services is full (0 entries): raise --max-frontends");
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

/// What a packet hook could see between any two writes must be whole:
/// every slot below a frontend's count names a live backend, every
/// affinity member is a live backend, every two-scope frontend's twin is
/// there, and every frontend has its name.
fn assert_consistent(maps: &Programmed, after: &Op) {
    for (key, fe) in &maps.services {
        for slot in 0..fe.backend_count {
            let Some(b) = maps.slots.get(&SlotKey { frontend_id: fe.id, slot }) else {
                panic!("after {after:?}: frontend {} exposes missing slot {slot}", fe.id)
            };
            assert!(
                maps.backends.contains_key(b),
                "after {after:?}: slot {slot} of {} names gone backend {b}",
                fe.id
            );
        }
        if fe.flags & frontend_flags::TWO_SCOPES != 0 {
            let twin = key.with_scope(Scope::Internal);
            assert!(
                maps.services.contains_key(&twin),
                "after {after:?}: {key:?} sends pods to a missing twin"
            );
        }
        assert!(maps.names.contains_key(&fe.id), "after {after:?}: frontend {} has no name", fe.id);
    }
    for m in &maps.affinity_match {
        assert!(maps.backends.contains_key(&m.backend_id), "after {after:?}: affinity member {m:?} is gone");
    }
}

/// A random desired state: up to 4 frontends (some two-scoped NodePorts)
/// over a pool of 8 backends.
fn arb_desired() -> impl Strategy<Value = Desired> {
    let fe = (
        prop::collection::vec(0u8..8, 0..6),
        prop::collection::vec(0u8..8, 0..3),
        any::<bool>(),
        any::<bool>(),
    );
    prop::collection::btree_map(0u16..4, fe, 0..4).prop_map(|services| {
        let mut d = Desired::default();
        for (i, (backends, standby, affinity, two_scopes)) in services {
            let mut backends: Vec<u8> = backends;
            backends.sort();
            backends.dedup();
            let mut fe = frontend(&format!("default/svc-{i}"), &backends);
            fe.standby = standby.iter().filter(|s| !backends.contains(s)).map(|s| be(*s)).collect();
            fe.standby.sort();
            fe.standby.dedup();
            fe.affinity_timeout = affinity.then_some(30);
            let key = Frontend::node_port(30000 + i, L4::Tcp);
            if two_scopes {
                // The twin takes every endpoint; the external one keeps the rest as standby.
                let mut twin = fe.clone();
                twin.backends.append(&mut twin.standby);
                twin.backends.sort();
                fe.two_scopes = true;
                d.frontends.insert(key.with_scope(Scope::Internal), Arc::new(twin));
            }
            d.frontends.insert(key, Arc::new(fe));
        }
        d
    })
}

proptest! {
    #[test]
    fn no_half_built_frontend_is_ever_visible(states in prop::collection::vec(arb_desired(), 1..8)) {
        let mut r = Reconciler::new();
        let mut store = MemoryStore::default();
        for d in &states {
            for op in r.plan(d, &node()).unwrap() {
                store.apply(&op).unwrap();
                assert_consistent(&store.maps, &op);
            }
            // What the maps hold is what a restart adopts: nothing to do.
            let mut adopted = Reconciler::adopt(&store.maps).unwrap();
            prop_assert_eq!(adopted.plan(d, &node()).unwrap(), vec![]);
        }
    }
}

/// More frontends than `lb_services` holds: those that fit are programmed
/// in the maps' key order, the rest are reported with the flag to raise
/// and planned again each time; changes to what is programmed still go in,
/// and a frontend that goes makes room for a waiting one.
#[test]
fn over_capacity_programs_what_fits_and_keeps_going() {
    let caps = [(&registry::SERVICES, 3usize)];
    let mut store = MemoryStore::with_capacities(&caps);
    let limits = Limits::from_capacity(|m| store.capacity(m).unwrap());
    let mut r = Reconciler::with_limits(limits);
    let key = |i: u8| Frontend::new(Ipv4Addr::new(10, 96, 0, i), 80, L4::Tcp);
    let mut d = Desired::default();
    for i in 1..=5 {
        d.frontends.insert(key(i), Arc::new(frontend(&format!("default/svc-{i}"), &[i])));
    }
    apply(&mut store, &r.plan(&d, &node()).unwrap()).unwrap();
    let programmed: Vec<_> = store.maps.services.keys().map(|k| k.addr[3]).collect();
    assert_eq!(programmed, [1, 2, 3]);
    let waiting: Vec<_> = r.overflow().keys().copied().collect();
    assert_eq!(waiting, [key(4), key(5)]);
    assert_eq!(
        r.overflow()[&key(4)].to_string(),
        "map lb_services is full (3 entries): raise --max-frontends"
    );

    // A change to a programmed frontend goes in though the map is full.
    Arc::make_mut(d.frontends.get_mut(&key(2)).unwrap()).backends.push(be(9));
    apply(&mut store, &r.plan(&d, &node()).unwrap()).unwrap();
    assert_eq!(store.maps.services[&keys::frontend_key(&key(2)).unwrap()].backend_count, 2);
    // One goes: the first waiting one takes its place.
    d.frontends.remove(&key(1));
    let ops = r.plan(&d, &node()).unwrap();
    apply(&mut store, &ops).unwrap();
    apply(&mut store, &r.plan(&d, &node()).unwrap()).unwrap();
    let programmed: Vec<_> = store.maps.services.keys().map(|k| k.addr[3]).collect();
    assert_eq!(programmed, [2, 3, 4]);
    assert_eq!(r.overflow().keys().copied().collect::<Vec<_>>(), [key(5)]);
}

/// After a restart, a frontend that grew past what the maps hold keeps
/// serving with what it had: its backends are not swept as stale.
#[test]
fn an_adopted_frontend_that_no_longer_fits_keeps_its_backends() {
    let caps = [(&registry::SLOTS, 5usize)];
    let mut store = MemoryStore::with_capacities(&caps);
    let limits = Limits::from_capacity(|m| store.capacity(m).unwrap());
    let mut d = Desired::default();
    d.frontends.insert(web(), Arc::new(frontend("default/web", &[1, 2, 3])));
    apply(&mut store, &Reconciler::with_limits(limits).plan(&d, &node()).unwrap()).unwrap();

    let mut r = Reconciler::adopt_with(&store.dump().unwrap(), limits).unwrap();
    d.frontends.insert(web(), Arc::new(frontend("default/web", &[1, 2, 3, 4, 5, 6])));
    let ops = r.plan(&d, &node()).unwrap();
    assert!(!ops.iter().any(|op| matches!(op, Op::DelBackend(_))), "{ops:?}");
    apply(&mut store, &ops).unwrap();
    assert_eq!(r.overflow().keys().copied().collect::<Vec<_>>(), [web()]);
    assert_eq!(store.maps.backends.len(), 3);
    assert_eq!(store.maps.services[&keys::frontend_key(&web()).unwrap()].backend_count, 3);
    // Once it fits again it is planned as usual.
    d.frontends.insert(web(), Arc::new(frontend("default/web", &[2, 3])));
    apply(&mut store, &r.plan(&d, &node()).unwrap()).unwrap();
    assert!(r.overflow().is_empty());
    assert_eq!(store.maps.backends.len(), 2, "the backend it dropped is swept");
}

/// An external frontend with an internal twin is programmed with it or
/// not at all: alone, it would send in-cluster clients to nothing.
#[test]
fn an_external_frontend_waits_for_its_internal_twin() {
    let caps = [(&registry::SLOTS, 3usize)];
    let mut store = MemoryStore::with_capacities(&caps);
    let mut r = Reconciler::with_limits(Limits::from_capacity(|m| store.capacity(m).unwrap()));
    let key = Frontend::new(Ipv4Addr::new(203, 0, 113, 10), 80, L4::Tcp);
    let mut external = frontend("default/web", &[1]);
    external.local_only = true;
    external.two_scopes = true;
    let mut d = Desired::default();
    d.frontends.insert(key, Arc::new(external));
    d.frontends.insert(key.with_scope(Scope::Internal), Arc::new(frontend("default/web", &[1, 2, 3, 4])));
    apply(&mut store, &r.plan(&d, &node()).unwrap()).unwrap();
    assert!(store.maps.services.is_empty(), "{:?}", store.maps.services);
    assert_eq!(r.overflow().len(), 2);
    assert!(r.overflow()[&key].to_string().contains("internal twin"), "{}", r.overflow()[&key]);
}

#[test]
fn adoption_completes_older_pins_and_drops_orphaned_endpoints() {
    let mut store = MemoryStore::default();
    apply(&mut store, &Reconciler::new().plan(&desired(&[1, 2]), &node()).unwrap()).unwrap();
    // As an older version left them: no endpoint entries, and one of a
    // frontend that is gone.
    let mut maps = store.dump().unwrap();
    maps.endpoints.clear();
    let orphan = AffinityMatchKey { frontend_id: 99, backend_id: 1 };
    maps.endpoints.insert(orphan);
    let mut r = Reconciler::adopt(&maps).unwrap();
    let ops = r.backfill(&maps);
    assert!(ops.contains(&Op::DelEndpoint(orphan)), "{ops:#?}");
    assert_eq!(
        ops.iter().filter(|o| matches!(o, Op::PutEndpoint(_))).count(),
        2,
        "the slots' backends: {ops:#?}"
    );
    // Then the first sync has nothing left to add.
    let mut adopted = MemoryStore::default();
    adopted.maps = maps;
    apply(&mut adopted, &ops).unwrap();
    assert!(!adopted.maps.endpoints.contains(&orphan));
    let again = r.plan(&desired(&[1, 2]), &node()).unwrap();
    assert!(!again.iter().any(|o| matches!(o, Op::PutEndpoint(_) | Op::DelEndpoint(_))), "{again:#?}");
}

#[test]
fn the_catch_all_follows_cluster_ips_as_frontends_come_go_and_change_kind() {
    let ip = [10, 96, 0, 10];
    let mut r = Reconciler::new();
    let ops = r.plan(&desired(&[1]), &node()).unwrap();
    assert!(ops.contains(&Op::PutClusterIp(ip)), "{ops:#?}");
    // An endpoint change leaves the ClusterIPs alone.
    let ops = r.plan(&desired(&[1, 2]), &node()).unwrap();
    assert!(!ops.iter().any(|o| matches!(o, Op::PutClusterIp(_) | Op::DelClusterIp(_))), "{ops:#?}");
    // The same address and port, now another Service's external IP.
    let mut external = desired(&[1, 2]);
    Arc::make_mut(external.frontends.get_mut(&web()).unwrap()).kind = FrontendKind::ExternalIp;
    let ops = r.plan(&external, &node()).unwrap();
    assert!(ops.contains(&Op::DelClusterIp(ip)), "{ops:#?}");
    let ops = r.plan(&desired(&[1, 2]), &node()).unwrap();
    assert!(ops.contains(&Op::PutClusterIp(ip)), "{ops:#?}");
    let ops = r.plan(&Desired::default(), &node()).unwrap();
    assert!(ops.contains(&Op::DelClusterIp(ip)), "{ops:#?}");
}
