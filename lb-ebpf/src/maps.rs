//! The maps the programs share with the agent, and typed accessors for them:
//! the rest of the crate reads and writes maps through these functions and
//! holds no `unsafe` for it. Names and capacities come from
//! `lb_common::registry` (a test checks the object against it); the agent
//! may resize maps at load time and pins them under its pin directory.

use aya_ebpf::{
    bindings::BPF_ANY,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    macros::btf_map,
};
use lb_common::{
    AffinityEntry, AffinityKey, AffinityMatchKey, Backend, Config, CtEntry, CtKey, Drop, Event, FlowBuf,
    FragEntry, FragKey, Frontend, FrontendKey, NextHop, ServiceName, SlotKey, SockKey, SockService,
    SourceRangeKey, SvcStats, registry as reg,
};

const fn cap(m: reg::MapDef) -> usize {
    m.capacity() as usize
}

#[btf_map(name = "lb_config")]
pub static LB_CONFIG: Array<Config, { cap(reg::CONFIG) }> = Array::new();

#[btf_map(name = "lb_node_addrs")]
pub static LB_NODE_ADDRS: HashMap<[u8; 4], u32, { cap(reg::NODE_ADDRS) }> = HashMap::new();

#[btf_map(name = "lb_cluster_ips")]
pub static LB_CLUSTER_IPS: HashMap<[u8; 4], u32, { cap(reg::CLUSTER_IPS) }> = HashMap::new();

#[btf_map(name = "lb_svc_cidrs")]
pub static LB_SVC_CIDRS: LpmTrie<[u8; 4], u32, { cap(reg::SERVICE_CIDRS) }> = LpmTrie::new();

#[btf_map(name = "lb_backends")]
pub static LB_BACKENDS: HashMap<u32, Backend, { cap(reg::BACKENDS) }> = HashMap::new();

#[btf_map(name = "lb_slots")]
pub static LB_SLOTS: HashMap<SlotKey, u32, { cap(reg::SLOTS) }> = HashMap::new();

#[btf_map(name = "lb_endpoints")]
pub static LB_ENDPOINTS: HashMap<AffinityMatchKey, u32, { cap(reg::ENDPOINTS) }> = HashMap::new();

#[btf_map(name = "lb_aff_match")]
pub static LB_AFF_MATCH: HashMap<AffinityMatchKey, u32, { cap(reg::AFFINITY_MATCH) }> = HashMap::new();

#[btf_map(name = "lb_src_ranges")]
pub static LB_SRC_RANGES: LpmTrie<SourceRangeKey, u32, { cap(reg::SOURCE_RANGES) }> = LpmTrie::new();

/// Read by operators and the agent only; the programs never look at it.
#[btf_map(name = "lb_svc_names")]
pub static LB_SVC_NAMES: HashMap<u32, ServiceName, { cap(reg::SERVICE_NAMES) }> = HashMap::new();

#[btf_map(name = "lb_pod_ifs")]
pub static LB_POD_IFS: HashMap<u32, u32, { cap(reg::POD_IFS) }> = HashMap::new();

#[btf_map(name = "lb_services")]
pub static LB_SERVICES: HashMap<FrontendKey, Frontend, { cap(reg::SERVICES) }> = HashMap::new();

#[btf_map(name = "lb_conntrack")]
pub static LB_CONNTRACK: LruHashMap<CtKey, CtEntry, { cap(reg::CONNTRACK) }> = LruHashMap::new();

#[btf_map(name = "lb_affinity")]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityEntry, { cap(reg::AFFINITY) }> = LruHashMap::new();

#[btf_map(name = "lb_sock_rev")]
pub static LB_SOCK_REV: LruHashMap<SockKey, SockService, { cap(reg::SOCK_REV) }> = LruHashMap::new();

#[btf_map(name = "lb_fragments")]
pub static LB_FRAGMENTS: LruHashMap<FragKey, FragEntry, { cap(reg::FRAGMENTS) }> = LruHashMap::new();

#[btf_map(name = "lb_svc_stats")]
pub static LB_SVC_STATS: PerCpuArray<SvcStats, { cap(reg::SVC_STATS) }> = PerCpuArray::new();

#[btf_map(name = "lb_drops")]
pub static LB_DROPS: PerCpuArray<u64, { cap(reg::DROPS) }> = PerCpuArray::new();

#[btf_map(name = "lb_events")]
pub static LB_EVENTS: PerCpuArray<u64, { cap(reg::EVENTS) }> = PerCpuArray::new();

#[btf_map(name = "lb_flow_buf")]
static LB_FLOW_BUF: PerCpuArray<FlowBuf, { cap(reg::FLOW_BUF) }> = PerCpuArray::new();

#[btf_map(name = "lb_next_hops")]
pub static LB_NEXT_HOPS: PerCpuArray<NextHop, { cap(reg::NEXT_HOPS) }> = PerCpuArray::new();

// SAFETY (for every read below): lookups return a pointer into the map's
// value, valid for this program run. Values are plain data; a concurrent
// update on another CPU can at worst be seen half-written, which the
// reconciler's write order (slots before the count that exposes them,
// backends before slots) keeps harmless.

pub fn frontend(key: &FrontendKey) -> Option<Frontend> {
    LB_SERVICES.get_ptr(key).map(|p| unsafe { *p })
}

pub fn backend(id: u32) -> Option<Backend> {
    LB_BACKENDS.get_ptr(&id).map(|p| unsafe { *p })
}

/// The backend id in slot `slot` of frontend `frontend_id`.
pub fn slot(frontend_id: u32, slot: u32) -> Option<u32> {
    LB_SLOTS.get_ptr(&SlotKey { frontend_id, slot }).map(|p| unsafe { *p })
}

pub fn is_node_addr(addr: &[u8; 4]) -> bool {
    LB_NODE_ADDRS.get_ptr(addr).is_some()
}

/// Whether some Service has `addr` as its ClusterIP.
pub fn is_cluster_ip(addr: &[u8; 4]) -> bool {
    LB_CLUSTER_IPS.get_ptr(addr).is_some()
}

/// Whether `addr` is inside one of the service CIDRs.
pub fn in_service_cidr(addr: [u8; 4]) -> bool {
    LB_SVC_CIDRS.get(&Key::new(32, addr)).is_some()
}

/// Whether `ifindex` is the host side of a pod's interface.
pub fn is_pod_if(ifindex: u32) -> bool {
    LB_POD_IFS.get_ptr(&ifindex).is_some()
}

pub fn config() -> Option<Config> {
    LB_CONFIG.get(0).copied()
}

/// Whether `client` is inside one of frontend `frontend_id`'s source ranges.
pub fn source_allowed(frontend_id: u32, client: [u8; 4]) -> bool {
    let key = Key::new(SourceRangeKey::prefix_len(32), SourceRangeKey::new(frontend_id, client));
    LB_SRC_RANGES.get(&key).is_some()
}

pub fn affinity(key: &AffinityKey) -> Option<AffinityEntry> {
    LB_AFFINITY.get_ptr(key).map(|p| unsafe { *p })
}

pub fn set_affinity(key: &AffinityKey, entry: &AffinityEntry) {
    // Best effort: a client without an entry just gets a fresh choice.
    let _ = LB_AFFINITY.insert(key, entry, BPF_ANY as u64);
}

/// Whether `backend_id` is still one of frontend `frontend_id`'s endpoints
/// (usable or not).
pub fn is_endpoint(frontend_id: u32, backend_id: u32) -> bool {
    LB_ENDPOINTS.get_ptr(&AffinityMatchKey { frontend_id, backend_id }).is_some()
}

/// Whether `backend_id` may still be chosen by affinity on `frontend_id`.
pub fn affinity_member(frontend_id: u32, backend_id: u32) -> bool {
    LB_AFF_MATCH.get_ptr(&AffinityMatchKey { frontend_id, backend_id }).is_some()
}

/// The service a socket hook translated `key`'s backend from.
pub fn sock_service(key: &SockKey) -> Option<SockService> {
    LB_SOCK_REV.get_ptr(key).map(|p| unsafe { *p })
}

pub fn set_sock_service(key: &SockKey, service: &SockService) {
    // Best effort: without it, recvmsg() and getpeername() show the backend.
    let _ = LB_SOCK_REV.insert(key, service, BPF_ANY as u64);
}

/// How the first fragment of `key`'s datagram was translated.
pub fn fragment(key: &FragKey) -> Option<FragEntry> {
    LB_FRAGMENTS.get_ptr(key).map(|p| unsafe { *p })
}

pub fn set_fragment(key: &FragKey, entry: &FragEntry) {
    // Best effort: without it, the later fragments pass untranslated and
    // the datagram is lost, as it would be to a full reassembly queue.
    let _ = LB_FRAGMENTS.insert(key, entry, BPF_ANY as u64);
}

pub fn forget_fragment(key: &FragKey) {
    // Mostly there is none: nothing to do then.
    let _ = LB_FRAGMENTS.remove(key);
}

/// The conntrack entry of `key`, read in place.
pub fn conntrack_peek(key: &CtKey) -> Option<&'static CtEntry> {
    LB_CONNTRACK.get_ptr(key).map(|p| unsafe { &*p })
}

/// The conntrack entry of `key`, to read and refresh in place.
pub fn conntrack_entry(key: &CtKey) -> Option<&'static mut CtEntry> {
    // SAFETY: valid for this program run; a concurrent update on another
    // CPU can at worst lose a timestamp refresh.
    LB_CONNTRACK.get_ptr_mut(key).map(|p| unsafe { &mut *p })
}

pub fn conntrack_delete(key: &CtKey) {
    // Gone already is as good.
    let _ = LB_CONNTRACK.remove(key);
}

pub fn conntrack_insert(key: &CtKey, entry: &CtEntry, flags: u32) -> Result<(), i32> {
    LB_CONNTRACK.insert(key, entry, flags as u64)
}

/// This CPU's scratch space for a new flow.
pub fn flow_buf() -> Option<&'static mut FlowBuf> {
    // SAFETY: a per-CPU slot, used by one program run at a time on this CPU.
    LB_FLOW_BUF.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The per-CPU next-hop cache slot `slot`.
pub fn next_hop(slot: u32) -> Option<&'static mut NextHop> {
    // SAFETY: a per-CPU slot, valid for this program run.
    LB_NEXT_HOPS.get_ptr_mut(slot).map(|p| unsafe { &mut *p })
}

/// Counts a packet against its frontend.
#[inline(always)]
pub fn count_packet(frontend_id: u32, bytes: u32, new_flow: bool) {
    if let Some(s) = LB_SVC_STATS.get_ptr_mut(frontend_id) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes as u64;
            if new_flow {
                (*s).new_flows += 1;
            }
        }
    }
}

#[inline(always)]
pub fn count_drop(reason: Drop) {
    if let Some(c) = LB_DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count_event(event: Event) {
    if let Some(c) = LB_EVENTS.get_ptr_mut(event as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}
