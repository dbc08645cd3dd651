//! The endpoints of one Service port, from its EndpointSlices, and which of
//! them take new connections: kube-proxy's `CategorizeEndpoints`.

use std::{collections::BTreeSet, net::IpAddr, sync::Arc};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_common::L4;

use super::{DesiredBackend, NodeInfo, spec::protocol};

/// One endpoint of one service port, with its conditions and what its
/// topology hints say about this node.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint {
    pub backend: DesiredBackend,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub hints: Hints,
}

/// An endpoint's topology hints (`hints.forZones`, `hints.forNodes`, which
/// the EndpointSlice controller writes for `trafficDistribution` and the
/// `service.kubernetes.io/topology-mode` annotation), against this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    pub has_zones: bool,
    /// Hinted for this node's zone.
    pub for_zone: bool,
    pub has_nodes: bool,
    /// Hinted for this node.
    pub for_node: bool,
}

/// Which endpoints Cluster policy may use on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// All of them.
    Any,
    /// Those hinted for this node (PreferSameNode).
    SameNode,
    /// Those hinted for this node's zone (PreferSameZone, PreferClose, Auto).
    SameZone,
}

/// The endpoints of the service port named `port_name`, matched by name and
/// protocol to the slices' ports, which carry the resolved target port.
pub fn endpoints(slices: &[Arc<EndpointSlice>], port_name: &str, l4: L4, node: &NodeInfo) -> Vec<Endpoint> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for slice in slices {
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name && protocol(p.protocol.as_deref()) == Ok(l4)
        }) else {
            continue;
        };
        let Some(port) = port.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
            continue;
        };
        for ep in &slice.endpoints {
            // kube-proxy uses the first address of an endpoint; a slice
            // holds one family (IPv4: `slice_owner` admits no other yet).
            let Some(addr) =
                ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()).filter(IpAddr::is_ipv4)
            else {
                continue;
            };
            if !seen.insert((addr, port)) {
                continue;
            }
            let local = ep.node_name.as_deref() == Some(node.name.as_str());
            let hints = ep.hints.as_ref().map_or(Hints::default(), |h| {
                let zones = h.for_zones.as_deref().unwrap_or_default();
                let nodes = h.for_nodes.as_deref().unwrap_or_default();
                Hints {
                    has_zones: !zones.is_empty(),
                    for_zone: node.zone.as_ref().is_some_and(|z| zones.iter().any(|f| &f.name == z)),
                    has_nodes: !nodes.is_empty(),
                    for_node: nodes.iter().any(|f| f.name == node.name),
                }
            });
            let c = ep.conditions.as_ref();
            out.push(Endpoint {
                backend: DesiredBackend { addr, port, local },
                ready: c.and_then(|c| c.ready).unwrap_or(true),
                serving: c.and_then(|c| c.serving).unwrap_or(true),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                hints,
            });
        }
    }
    out
}

/// kube-proxy's choice: ready endpoints; when none is ready, those still
/// serving while terminating. Sorted. (Local policy's choice, on the local
/// endpoints: topology does not apply to it.)
pub fn usable<'a>(eps: impl Iterator<Item = &'a Endpoint> + Clone) -> Vec<DesiredBackend> {
    usable_in(eps, Topology::Any)
}

/// Cluster policy's choice: the ready endpoints the topology admits; when
/// none is ready anywhere, those serving while terminating, whatever their
/// hints (kube-proxy falls back to them without topology).
pub fn cluster_usable(eps: &[Endpoint]) -> Vec<DesiredBackend> {
    usable_in(eps.iter(), topology(eps))
}

fn usable_in<'a>(eps: impl Iterator<Item = &'a Endpoint> + Clone, topology: Topology) -> Vec<DesiredBackend> {
    let admits = |e: &Endpoint| match topology {
        Topology::Any => true,
        Topology::SameNode => e.hints.for_node,
        Topology::SameZone => e.hints.for_zone,
    };
    let mut ready: Vec<_> = eps.clone().filter(|e| e.ready && admits(e)).map(|e| e.backend).collect();
    if ready.is_empty() {
        ready = eps.filter(|e| e.serving && e.terminating).map(|e| e.backend).collect();
    }
    ready.sort();
    ready
}

/// kube-proxy's `topologyModeFromHints`: hints count only when every ready
/// endpoint has them and one is for this node (node hints, first) or this
/// zone; else every endpoint may be used. (A node without a zone matches
/// no zone hint.)
pub fn topology(eps: &[Endpoint]) -> Topology {
    let ready: Vec<&Endpoint> = eps.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return Topology::Any;
    }
    if ready.iter().all(|e| e.hints.has_nodes) && ready.iter().any(|e| e.hints.for_node) {
        return Topology::SameNode;
    }
    if ready.iter().all(|e| e.hints.has_zones) && ready.iter().any(|e| e.hints.for_zone) {
        return Topology::SameZone;
    }
    Topology::Any
}
