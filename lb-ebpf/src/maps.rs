//! The maps the programs share with the agent. Capacities are the compiled-in
//! defaults of `lb_common::capacity`; the agent may resize them at load time
//! and pins every map by name under its pin directory.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    AffinityEntry, AffinityKey, AffinityMatchKey, Backend, Config, CtEntry, CtKey, Frontend, FrontendKey,
    NEXT_HOP_SLOTS, NextHop, SlotKey, SourceRangeKey, SvcStats, capacity as cap,
};

#[btf_map(name = "lb_services", pin_by_name)]
pub static LB_SERVICES: HashMap<FrontendKey, Frontend, { cap::SERVICES as usize }> = HashMap::new();

#[btf_map(name = "lb_backends", pin_by_name)]
pub static LB_BACKENDS: HashMap<u32, Backend, { cap::BACKENDS as usize }> = HashMap::new();

#[btf_map(name = "lb_slots", pin_by_name)]
pub static LB_SLOTS: HashMap<SlotKey, u32, { cap::SLOTS as usize }> = HashMap::new();

#[btf_map(name = "lb_conntrack", pin_by_name)]
pub static LB_CONNTRACK: LruHashMap<CtKey, CtEntry, { cap::CONNTRACK as usize }> = LruHashMap::new();

/// A cache, private to each program load (not pinned).
#[btf_map(name = "lb_next_hops")]
pub static LB_NEXT_HOPS: PerCpuArray<NextHop, { NEXT_HOP_SLOTS as usize }> = PerCpuArray::new();

#[btf_map(name = "lb_affinity", pin_by_name)]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityEntry, { cap::AFFINITY as usize }> =
    LruHashMap::new();

#[btf_map(name = "lb_affinity_match", pin_by_name)]
pub static LB_AFFINITY_MATCH: HashMap<AffinityMatchKey, u32, { cap::AFFINITY_MATCH as usize }> =
    HashMap::new();

#[btf_map(name = "lb_source_ranges", pin_by_name)]
pub static LB_SOURCE_RANGES: LpmTrie<SourceRangeKey, u32, { cap::SOURCE_RANGES as usize }> = LpmTrie::new();

#[btf_map(name = "lb_node_addrs", pin_by_name)]
pub static LB_NODE_ADDRS: HashMap<[u8; 4], u32, { cap::NODE_ADDRS as usize }> = HashMap::new();

#[btf_map(name = "lb_svc_stats", pin_by_name)]
pub static LB_SVC_STATS: PerCpuArray<SvcStats, { cap::SVC_STATS as usize }> = PerCpuArray::new();

#[btf_map(name = "lb_drops", pin_by_name)]
pub static LB_DROPS: PerCpuArray<u64, { lb_common::Drop::COUNT as usize }> = PerCpuArray::new();

#[btf_map(name = "lb_config", pin_by_name)]
pub static LB_CONFIG: Array<Config, 1> = Array::new();

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
pub fn count_drop(reason: lb_common::Drop) {
    if let Some(c) = LB_DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}
