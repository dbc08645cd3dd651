//! The endpoints of one Service port, from its EndpointSlices, and which of
//! them take new connections.

use std::{collections::BTreeSet, net::IpAddr, sync::Arc};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_common::L4;

use super::{DesiredBackend, NodeInfo, spec::protocol};

/// One endpoint of one service port, with its conditions.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint {
    pub backend: DesiredBackend,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
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
            let c = ep.conditions.as_ref();
            out.push(Endpoint {
                backend: DesiredBackend { addr, port, local },
                ready: c.and_then(|c| c.ready).unwrap_or(true),
                serving: c.and_then(|c| c.serving).unwrap_or(true),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            });
        }
    }
    out
}

/// kube-proxy's choice: ready endpoints; when none is ready, those still
/// serving while terminating. Sorted.
pub fn usable<'a>(eps: impl Iterator<Item = &'a Endpoint> + Clone) -> Vec<DesiredBackend> {
    let mut ready: Vec<_> = eps.clone().filter(|e| e.ready).map(|e| e.backend).collect();
    if ready.is_empty() {
        ready = eps.filter(|e| e.serving && e.terminating).map(|e| e.backend).collect();
    }
    ready.sort();
    ready
}
