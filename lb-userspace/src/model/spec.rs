//! A Service as the proxy reads it: its addresses, ports and policies,
//! parsed once, with a note for each part it cannot program.

use std::net::IpAddr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Service, ServicePort};
use lb_common::L4;

use super::{LABEL_PROXY_NAME, label};

pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// What the proxy does with one Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceSpec {
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`, except ipMode Proxy.
    pub lb_ips: Vec<IpAddr>,
    /// loadBalancerSourceRanges (LoadBalancer ingress frontends only).
    pub source_ranges: Vec<Ipv4Net>,
    /// sessionAffinity ClientIP timeout.
    pub affinity_timeout: Option<u32>,
    pub internal_local: bool,
    pub external_local: bool,
    /// NodePort or LoadBalancer: node ports are served.
    pub node_ports: bool,
    /// healthCheckNodePort to serve: LoadBalancer with externalTrafficPolicy Local.
    pub health_check_port: Option<u16>,
    pub ports: Vec<PortSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub name: String,
    pub port: u16,
    pub l4: L4,
    pub node_port: Option<u16>,
}

/// The protocol of a Service or EndpointSlice port, if the dataplane
/// translates it.
pub fn protocol(p: Option<&str>) -> Result<L4, String> {
    match L4::from_name(p.unwrap_or("TCP")) {
        Some(L4::Sctp) => Err("SCTP is not programmed yet (the dataplane handles TCP and UDP)".into()),
        Some(l4) => Ok(l4),
        None => Err(format!("unknown protocol {}", p.unwrap_or_default())),
    }
}

/// Parses `svc`; `None` for Services the proxy leaves alone (another
/// proxy's, ExternalName, headless), with a note where that is unexpected.
pub fn parse(svc: &Service, note: &mut dyn FnMut(String)) -> Option<ServiceSpec> {
    if let Some(proxy) = label(&svc.metadata, LABEL_PROXY_NAME) {
        note(format!("handled by service proxy {proxy:?}: skipped"));
        return None;
    }
    let Some(spec) = &svc.spec else {
        note("no spec: skipped".into());
        return None;
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return None;
    }
    let mut cluster_ips: Vec<&str> = spec.cluster_ips.iter().flatten().map(String::as_str).collect();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip.as_deref());
    }
    if cluster_ips.contains(&"None") {
        return None; // headless: DNS only
    }
    let mut ip = |what: &str, text: &str| -> Option<IpAddr> {
        match text.parse::<IpAddr>() {
            Ok(ip @ IpAddr::V4(_)) => Some(ip),
            Ok(IpAddr::V6(_)) => {
                note(format!("{what} {text}: IPv6 waits for the IPv6 dataplane, not programmed"));
                None
            }
            Err(_) => {
                note(format!("{what} {text:?} is not an IP address: ignored"));
                None
            }
        }
    };
    let cluster_ips = cluster_ips.iter().filter_map(|t| ip("clusterIP", t)).collect();
    let external_ips = spec.external_ips.iter().flatten().filter_map(|t| ip("externalIP", t)).collect();
    let mut lb_ips = Vec::new();
    if svc_type == "LoadBalancer" {
        let ingress = svc
            .status
            .iter()
            .filter_map(|s| s.load_balancer.as_ref())
            .flat_map(|lb| lb.ingress.iter().flatten());
        for ing in ingress {
            // ipMode Proxy: the cloud load balancer proxies; traffic never
            // arrives addressed to the VIP.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            lb_ips.extend(ing.ip.as_deref().and_then(|t| ip("load balancer ingress", t)));
        }
    }
    let mut source_ranges = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        match r.trim().parse::<Ipv4Net>() {
            Ok(net) => source_ranges.push(net.trunc()),
            Err(_) if r.contains(':') => {}
            Err(_) => note(format!("loadBalancerSourceRanges entry {r:?} is not a CIDR: ignored")),
        }
    }
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    // kube-proxy serves it for LoadBalancer services with policy Local: the
    // cloud load balancer sends traffic only to nodes answering 200.
    let health_check_port = (svc_type == "LoadBalancer" && external_local)
        .then(|| spec.health_check_node_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0))
        .flatten();
    let ports = spec.ports.iter().flatten().filter_map(|p| port(p, note)).collect();
    Some(ServiceSpec {
        cluster_ips,
        external_ips,
        lb_ips,
        source_ranges,
        affinity_timeout,
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_local,
        node_ports: matches!(svc_type, "NodePort" | "LoadBalancer"),
        health_check_port,
        ports,
    })
}

fn port(p: &ServicePort, note: &mut dyn FnMut(String)) -> Option<PortSpec> {
    let name = p.name.clone().unwrap_or_default();
    let l4 = match protocol(p.protocol.as_deref()) {
        Ok(l4) => l4,
        Err(e) => {
            note(format!("port {} ({name:?}): {e}", p.port));
            return None;
        }
    };
    let Ok(port) = u16::try_from(p.port) else {
        note(format!("port {} is out of range: ignored", p.port));
        return None;
    };
    let node_port = p.node_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0);
    Some(PortSpec { name, port, l4, node_port })
}
