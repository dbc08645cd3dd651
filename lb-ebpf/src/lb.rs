//! Service lookup and backend selection: what happens to a packet, decided
//! from the maps alone. The hooks in `main.rs` carry the verdict out.

use aya_ebpf::{btf_maps::lpm_trie::Key, helpers::generated::bpf_get_prandom_u32};
use lb_common::{
    AffinityEntry, AffinityKey, AffinityMatchKey, Backend, Config, CtEntry, CtKey, Drop, Frontend,
    FrontendKey, Nat, SlotKey, SourceRangeKey, backend_flags, ct_flags, frontend_flags,
};

use crate::{
    conntrack,
    maps::{
        LB_AFFINITY, LB_AFFINITY_MATCH, LB_BACKENDS, LB_CONFIG, LB_NODE_ADDRS, LB_SERVICES, LB_SLOTS,
        LB_SOURCE_RANGES, count_packet,
    },
    parse::Packet,
};

/// How many random SNAT ports a new flow tries before giving up.
const NAT_PORT_TRIES: u32 = 16;
const NS_PER_SEC: u64 = 1_000_000_000;

/// Where the program runs, which decides whether remote backends need SNAT.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// The node's external interface: clients outside the cluster.
    External,
    /// The host side of a pod's interface: clients are pods, whose replies
    /// return through this node anyway.
    Pod,
}

pub enum Verdict {
    /// Not service traffic: leave it to the stack.
    Pass,
    Drop(Drop),
    /// Service without endpoints: answer ICMP port unreachable.
    Reject,
    /// Rewrite the packet as its conntrack entry says.
    Translate(Nat),
}

/// Decides what to do with `pkt`: an existing flow keeps its translation; a
/// new packet to a frontend gets a backend and a conntrack entry.
#[inline(always)]
pub fn process(pkt: &Packet, hook: Hook) -> Verdict {
    let now = conntrack::now();
    if let Some(entry) = conntrack::lookup(&pkt.key, pkt.tcp_flags, now) {
        // A request keeps its backend while the backend exists; replies are
        // always translated back.
        if entry.is_reply() || LB_BACKENDS.get_ptr(&entry.backend_id).is_some() {
            count_packet(entry.frontend_id, pkt.ip_len as u32, false);
            return Verdict::Translate(entry.nat());
        }
    }
    match frontend(&pkt.key) {
        Some(fe) => new_flow(pkt, &fe, hook, now),
        None => Verdict::Pass,
    }
}

/// The frontend `key` is addressed to: an exact service address, or a
/// NodePort on one of this node's addresses.
#[inline(always)]
fn frontend(key: &CtKey) -> Option<Frontend> {
    let exact = FrontendKey::new(key.daddr, key.dport, key.proto);
    if let Some(fe) = LB_SERVICES.get_ptr(&exact) {
        return Some(unsafe { *fe });
    }
    LB_NODE_ADDRS.get_ptr(&key.daddr)?;
    let node_port = FrontendKey::new([0; 4], key.dport, key.proto);
    LB_SERVICES.get_ptr(&node_port).map(|fe| unsafe { *fe })
}

// Its own BPF function: a stack frame apart from the established-flow path.
#[inline(never)]
fn new_flow(pkt: &Packet, fe: &Frontend, hook: Hook, now: u64) -> Verdict {
    let client = pkt.key.saddr;
    if fe.flags & frontend_flags::SOURCE_RANGES != 0 {
        let key = Key::new(SourceRangeKey::prefix_len(32), SourceRangeKey::new(fe.id, client));
        if LB_SOURCE_RANGES.get(&key).is_none() {
            return Verdict::Drop(Drop::SourceRange);
        }
    }
    if fe.backend_count == 0 {
        // kube-proxy: traffic policy Local without a local endpoint drops;
        // a service with no endpoint at all rejects.
        return if fe.flags & frontend_flags::LOCAL_ONLY != 0 {
            Verdict::Drop(Drop::NoLocalEndpoint)
        } else {
            Verdict::Reject
        };
    }
    let Some((backend_id, backend)) = select_backend(fe, client, now) else {
        return Verdict::Drop(Drop::RewriteFailed);
    };

    let mut request = CtEntry {
        nat_daddr: backend.addr,
        nat_dport: backend.port,
        backend_id,
        frontend_id: fe.id,
        last_seen: now,
        flags: ct_flags::REWRITE_DST,
        tcp: pkt.tcp_flags,
        ..CtEntry::default()
    };
    let mut reply = CtEntry {
        nat_saddr: pkt.key.daddr,
        nat_sport: pkt.key.dport,
        backend_id,
        frontend_id: fe.id,
        last_seen: now,
        flags: ct_flags::REPLY | ct_flags::REWRITE_SRC,
        ..CtEntry::default()
    };
    let mut reply_key = CtKey::new(backend.addr, client, backend.port, pkt.key.sport, pkt.key.proto);

    // An external client reaching a backend on another node is source-NATed
    // to this node, so that the reply comes back here to be translated.
    if hook == Hook::External && backend.flags & backend_flags::LOCAL == 0 {
        let Some(cfg) = LB_CONFIG.get(0) else {
            return Verdict::Drop(Drop::NatExhausted);
        };
        if !snat(&mut request, &mut reply, &mut reply_key, cfg) {
            return Verdict::Drop(Drop::NatExhausted);
        }
    } else if conntrack::insert(&reply_key, &reply).is_err() {
        return Verdict::Drop(Drop::ConntrackFull);
    }
    if conntrack::insert(&pkt.key, &request).is_err() {
        return Verdict::Drop(Drop::ConntrackFull);
    }

    if fe.flags & frontend_flags::AFFINITY != 0 {
        let key = AffinityKey { frontend_id: fe.id, client };
        let value = AffinityEntry { backend_id, _pad: 0, last_used: now };
        let _ = LB_AFFINITY.insert(&key, &value, 0);
    }
    count_packet(fe.id, pkt.ip_len as u32, true);
    Verdict::Translate(request.nat())
}

/// The client's previous backend while its affinity holds, else a random
/// active slot. Slots are `0..backend_count`, so one lookup picks one.
#[inline(always)]
fn select_backend(fe: &Frontend, client: [u8; 4], now: u64) -> Option<(u32, Backend)> {
    if fe.flags & frontend_flags::AFFINITY != 0
        && let Some(a) = LB_AFFINITY.get_ptr(&AffinityKey { frontend_id: fe.id, client })
    {
        let a = unsafe { *a };
        let fresh = now.saturating_sub(a.last_used) <= fe.affinity_timeout as u64 * NS_PER_SEC;
        let member = AffinityMatchKey { frontend_id: fe.id, backend_id: a.backend_id };
        if fresh
            && LB_AFFINITY_MATCH.get_ptr(&member).is_some()
            && let Some(b) = LB_BACKENDS.get_ptr(&a.backend_id)
        {
            return Some((a.backend_id, unsafe { *b }));
        }
    }
    // SAFETY: helper without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % fe.backend_count;
    let id = unsafe { *LB_SLOTS.get_ptr(&SlotKey { frontend_id: fe.id, slot })? };
    let backend = unsafe { *LB_BACKENDS.get_ptr(&id)? };
    Some((id, backend))
}

/// Adds SNAT to a new flow: claims a free source port on `cfg.snat_addr`
/// toward the backend by inserting the reply entry under it.
#[inline(always)]
fn snat(request: &mut CtEntry, reply: &mut CtEntry, reply_key: &mut CtKey, cfg: &Config) -> bool {
    reply.flags |= ct_flags::REWRITE_DST | ct_flags::SNAT;
    reply.nat_daddr = reply_key.daddr;
    reply.nat_dport = reply_key.dport;
    reply_key.daddr = cfg.snat_addr;

    let range = cfg.nat_port_max.saturating_sub(cfg.nat_port_min) as u32 + 1;
    // SAFETY: helper without arguments.
    let start = unsafe { bpf_get_prandom_u32() };
    for i in 0..NAT_PORT_TRIES {
        let port = cfg.nat_port_min + (start.wrapping_add(i) % range) as u16;
        reply_key.dport = port;
        if conntrack::claim(reply_key, reply) {
            request.flags |= ct_flags::REWRITE_SRC | ct_flags::SNAT;
            request.nat_saddr = cfg.snat_addr;
            request.nat_sport = port;
            return true;
        }
    }
    false
}
