//! Service lookup and backend choice, decided from the maps alone: no
//! packet, no conntrack. The packet hooks call these through `flow`, the
//! socket hooks (`sock`) as they are.

use aya_ebpf::helpers::generated::bpf_get_prandom_u32;
use lb_common::{AffinityEntry, AffinityKey, Backend, Drop, Frontend, FrontendKey, Scope, frontend_flags};

use crate::maps;

const NS_PER_SEC: u64 = 1_000_000_000;

/// Where a client is, as far as Services are concerned.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Outside the cluster, through the node's external interface.
    External,
    /// A pod, through the host side of its interface: in-cluster, and its
    /// replies come back through this node anyway.
    Pod,
    /// A socket of the node's own network namespace (the socket hooks):
    /// in-cluster, and NodePorts answer on loopback too, as kube-proxy's
    /// iptables mode has them.
    Host,
}

/// The frontend `daddr:dport` names for a client at `origin`: an exact
/// service address, or a NodePort on one of this node's addresses. An
/// in-cluster client of a frontend with two scopes gets its internal twin.
#[inline(always)]
pub fn frontend(daddr: [u8; 4], dport: u16, proto: u8, origin: Origin) -> Option<Frontend> {
    // 0.0.0.0 is nobody's address: it must not match the NodePort wildcard.
    if daddr == [0; 4] {
        return None;
    }
    let mut key = FrontendKey { addr: daddr, port: dport, proto, scope: Scope::External as u8 };
    let fe = match maps::frontend(&key) {
        Some(fe) => fe,
        None => {
            let loopback = origin == Origin::Host && daddr[0] == 127;
            if !loopback && !maps::is_node_addr(&daddr) {
                return None;
            }
            key.addr = [0; 4];
            maps::frontend(&key)?
        }
    };
    if origin != Origin::External && fe.flags & frontend_flags::TWO_SCOPES != 0 {
        return maps::frontend(&key.with_scope(Scope::Internal));
    }
    Some(fe)
}

/// What becomes of a packet for no frontend: kube-proxy's nftables
/// catch-all for the service CIDRs.
pub enum Unserved {
    /// Not a service address: not ours.
    Pass,
    /// An allocated ClusterIP on a port no Service uses: port unreachable.
    Reject,
    /// An address of a service CIDR no Service has.
    Drop,
}

#[inline(always)]
pub fn unserved(daddr: [u8; 4]) -> Unserved {
    if !maps::in_service_cidr(daddr) {
        Unserved::Pass
    } else if maps::is_cluster_ip(&daddr) {
        Unserved::Reject
    } else {
        Unserved::Drop
    }
}

/// What a new connection to a frontend gets.
pub enum Choice {
    Backend(u32, Backend),
    /// No endpoint at all: answer port unreachable.
    Reject,
    Drop(Drop),
}

/// Source ranges, then a backend: the client's affine one while it holds,
/// else a random live slot.
#[inline(always)]
pub fn choose(fe: &Frontend, client: [u8; 4], now: u64) -> Choice {
    if fe.flags & frontend_flags::SOURCE_RANGES != 0 && !maps::source_allowed(fe.id, client) {
        return Choice::Drop(Drop::SourceRange);
    }
    if fe.backend_count == 0 {
        // kube-proxy: traffic policy Local without a local endpoint drops;
        // a service with no endpoint at all rejects.
        return if fe.flags & frontend_flags::LOCAL_ONLY != 0 {
            Choice::Drop(Drop::NoLocalEndpoint)
        } else {
            Choice::Reject
        };
    }
    if let Some(affine) = affine_backend(fe, client, now) {
        return Choice::Backend(affine.0, affine.1);
    }
    // SAFETY: helper without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % fe.backend_count;
    let Some(id) = maps::slot(fe.id, slot) else { return Choice::Drop(Drop::NoBackend) };
    match maps::backend(id) {
        Some(backend) => Choice::Backend(id, backend),
        None => Choice::Drop(Drop::NoBackend),
    }
}

/// The client's previous backend, while its affinity is fresh and the
/// backend may still be chosen.
#[inline(always)]
fn affine_backend(fe: &Frontend, client: [u8; 4], now: u64) -> Option<(u32, Backend)> {
    if fe.flags & frontend_flags::AFFINITY == 0 {
        return None;
    }
    let a = maps::affinity(&AffinityKey { frontend_id: fe.id, client })?;
    let fresh = now.saturating_sub(a.last_used) <= fe.affinity_timeout as u64 * NS_PER_SEC;
    if !fresh || !maps::affinity_member(fe.id, a.backend_id) {
        return None;
    }
    Some((a.backend_id, maps::backend(a.backend_id)?))
}

/// Records the client's backend for ClientIP affinity.
#[inline(always)]
pub fn remember(fe: &Frontend, client: [u8; 4], backend_id: u32, now: u64) {
    if fe.flags & frontend_flags::AFFINITY != 0 {
        let key = AffinityKey { frontend_id: fe.id, client };
        maps::set_affinity(&key, &AffinityEntry { backend_id, _pad: 0, last_used: now });
    }
}
