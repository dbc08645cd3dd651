//! The frontends of one Service port: which addresses answer, for which
//! clients, with which endpoints.

use std::{collections::BTreeSet, net::IpAddr, sync::Arc};

use crate::frontend::{Frontend, FrontendKind, Scope};

use super::{
    DesiredBackend, DesiredFrontend,
    endpoints::{Endpoint, cluster_usable, usable},
    spec::{PortSpec, ServiceSpec},
};

/// The frontends `spec`'s `port` asks for, given its endpoints `eps`; also
/// the addresses of its ready local endpoints (for the health check).
pub fn port_frontends(
    service: &str,
    spec: &ServiceSpec,
    port: &PortSpec,
    eps: &[Endpoint],
) -> (Vec<(Frontend, Arc<DesiredFrontend>)>, BTreeSet<IpAddr>) {
    let cluster = cluster_usable(eps);
    let local = usable(eps.iter().filter(|e| e.backend.local));
    let any_usable = !cluster.is_empty() || !local.is_empty();
    // An endpoint that stopped serving is no endpoint any more: its UDP
    // flows move (kube-proxy flushes their conntrack entries then), TCP
    // connections go on through conntrack.
    let all: Vec<DesiredBackend> = eps.iter().filter(|e| e.serving || e.ready).map(|e| e.backend).collect();
    let make = |kind, local_policy: bool, source_ranges: bool| {
        let backends = if local_policy { local.clone() } else { cluster.clone() };
        let mut standby: Vec<_> = all.iter().filter(|b| !backends.contains(b)).copied().collect();
        standby.sort();
        DesiredFrontend {
            service: service.to_string(),
            port_name: port.name.clone(),
            kind,
            backends,
            standby,
            affinity_timeout: spec.affinity_timeout,
            source_ranges: if source_ranges { spec.source_ranges.clone() } else { Vec::new() },
            local_only: local_policy && any_usable,
            two_scopes: false,
        }
    };

    let mut out = Vec::new();
    for ip in &spec.cluster_ips {
        // internalTrafficPolicy governs every client of a ClusterIP.
        let fe = make(FrontendKind::ClusterIp, spec.internal_local, false);
        out.push((Frontend::new(*ip, port.port, port.l4), fe));
    }
    let mut external = Vec::new();
    if spec.node_ports
        && let Some(np) = port.node_port
    {
        external.push((Frontend::node_port(np, port.l4), FrontendKind::NodePort, false));
    }
    for ip in &spec.external_ips {
        external.push((Frontend::new(*ip, port.port, port.l4), FrontendKind::ExternalIp, false));
    }
    for ip in &spec.lb_ips {
        external.push((Frontend::new(*ip, port.port, port.l4), FrontendKind::LoadBalancer, true));
    }
    for (key, kind, ranges) in external {
        let mut fe = make(kind, spec.external_local, ranges);
        if spec.external_local {
            // In-cluster clients are subject to neither traffic policy, as
            // if they went out to the load balancer and came back in
            // (kube-proxy's "pod traffic for external destinations"): they
            // get a twin with the cluster's endpoints.
            fe.two_scopes = true;
            out.push((key.with_scope(Scope::Internal), make(kind, false, ranges)));
        }
        out.push((key, fe));
    }
    // The health check counts ready local endpoints only: a node left with
    // terminating ones still serves them but tells load balancers to go
    // elsewhere (kube-proxy answers 503 then).
    let local_ready = eps.iter().filter(|e| e.backend.local && e.ready).map(|e| e.backend.addr).collect();
    (out.into_iter().map(|(k, fe)| (k, Arc::new(fe))).collect(), local_ready)
}
