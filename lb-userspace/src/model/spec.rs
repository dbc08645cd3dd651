//! A Service as the proxy reads it: its addresses, ports and policies,
//! parsed once, with a note for each part it cannot program.

use std::net::IpAddr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Service, ServicePort};
use lb_common::L4;

use super::{LABEL_HEADLESS, LABEL_PROXY_NAME, NodeInfo, label};

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

/// The protocol of a Service or EndpointSlice port (TCP by default).
pub fn protocol(p: Option<&str>) -> Result<L4, String> {
    L4::from_name(p.unwrap_or("TCP")).ok_or_else(|| format!("unknown protocol {}", p.unwrap_or_default()))
}

/// `text` as an address the dataplane serves (IPv4), with a note if not.
fn ip(what: &str, text: &str, note: &mut dyn FnMut(String)) -> Option<IpAddr> {
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
}

/// Whether `ip` can be a service address: the API server refuses the
/// unspecified, loopback, link-local, multicast and broadcast addresses,
/// and one of the node's own would take over the node's traffic.
fn service_address(ip: IpAddr, node: &NodeInfo) -> Result<(), &'static str> {
    let special = match ip {
        IpAddr::V4(v4) => {
            v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_loopback() || v6.is_multicast(),
    };
    if special {
        return Err("not a valid service address");
    }
    if node.addresses.contains(&ip) {
        return Err("one of this node's addresses");
    }
    Ok(())
}

/// Parses `svc`; `None` for Services the proxy leaves alone (another
/// proxy's, ExternalName, headless) or that the API server would refuse
/// (with a note saying why).
pub fn parse(svc: &Service, node: &NodeInfo, note: &mut dyn FnMut(String)) -> Option<ServiceSpec> {
    if let Some(proxy) = label(&svc.metadata, LABEL_PROXY_NAME) {
        note(format!("handled by service proxy {proxy:?}: skipped"));
        return None;
    }
    // kube-proxy's watches leave out Services with this label, as they do
    // their slices (the Kubernetes source asks the API server the same).
    if label(&svc.metadata, LABEL_HEADLESS).is_some() {
        return None;
    }
    let Some(spec) = &svc.spec else {
        note("no spec: skipped".into());
        return None;
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    match svc_type {
        "ExternalName" => return None,
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        other => {
            note(format!("unknown type {other:?}: not programmed"));
            return None;
        }
    }
    let mut cluster_ips: Vec<&str> = spec.cluster_ips.iter().flatten().map(String::as_str).collect();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip.as_deref());
    }
    if cluster_ips.contains(&"None") {
        return None; // headless: DNS only
    }
    let cluster_ips: Vec<IpAddr> = cluster_ips.iter().filter_map(|t| ip("clusterIP", t, note)).collect();
    let external_ips: Vec<IpAddr> =
        spec.external_ips.iter().flatten().filter_map(|t| ip("externalIP", t, note)).collect();
    let lb_ips: Vec<IpAddr> = if svc_type == "LoadBalancer" {
        let ingress = svc
            .status
            .iter()
            .filter_map(|s| s.load_balancer.as_ref())
            .flat_map(|lb| lb.ingress.iter().flatten());
        // ipMode Proxy: the cloud load balancer proxies; traffic never
        // arrives addressed to the VIP.
        ingress
            .filter(|ing| ing.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|ing| ing.ip.as_deref().and_then(|t| ip("load balancer ingress", t, note)))
            .collect()
    } else {
        Vec::new()
    };
    // What the API server refuses, it would not have stored: no part of
    // such a Service is programmed.
    for (what, addr) in
        cluster_ips.iter().map(|a| ("clusterIP", a)).chain(external_ips.iter().map(|a| ("externalIP", a)))
    {
        if let Err(why) = service_address(*addr, node) {
            note(format!("{what} {addr} is {why}: not programmed"));
            return None;
        }
    }
    // CVE-2020-8554: where an allow-list is set, externalIPs outside it
    // are not served.
    let external_ips = external_ips
        .into_iter()
        .filter(|addr| {
            let allowed =
                node.external_ip_cidrs.is_empty() || node.external_ip_cidrs.iter().any(|n| n.contains(addr));
            if !allowed {
                note(format!("externalIP {addr} is outside --external-ip-cidrs: not programmed"));
            }
            allowed
        })
        .collect();
    let mut source_ranges = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        match r.trim().parse::<Ipv4Net>() {
            Ok(net) => source_ranges.push(net.trunc()),
            Err(_) if r.contains(':') => {}
            Err(_) => note(format!("loadBalancerSourceRanges entry {r:?} is not a CIDR: ignored")),
        }
    }
    source_ranges.extend(implicit_allows(&source_ranges, &node.addresses, &lb_ips));
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    let affinity_timeout = match (spec.session_affinity.as_deref(), timeout) {
        (Some("ClientIP"), None) => Some(DEFAULT_AFFINITY_TIMEOUT),
        (Some("ClientIP"), Some(t @ 1..=86_400)) => Some(t as u32),
        (Some("ClientIP"), Some(t)) => {
            note(format!("sessionAffinityConfig timeoutSeconds {t} is not within 1-86400: not programmed"));
            return None;
        }
        (None | Some("None"), _) => None,
        (Some(other), _) => {
            note(format!("unknown sessionAffinity {other:?}: not programmed"));
            return None;
        }
    };
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    // kube-proxy serves it for LoadBalancer services with policy Local: the
    // cloud load balancer sends traffic only to nodes answering 200.
    let health_check_port = (svc_type == "LoadBalancer" && external_local)
        .then(|| spec.health_check_node_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0))
        .flatten();
    let node_ports = matches!(svc_type, "NodePort" | "LoadBalancer");
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        match port(p, i, node_ports, node, note) {
            Ok(Some(port)) => ports.push(port),
            Ok(None) => {}
            Err(why) => {
                note(format!("{why}: not programmed"));
                return None;
            }
        }
    }
    Some(ServiceSpec {
        cluster_ips,
        external_ips,
        lb_ips,
        source_ranges,
        affinity_timeout,
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_local,
        node_ports,
        health_check_port,
        ports,
    })
}

/// Port `i`: `Err` for what the API server refuses (the whole Service),
/// `Ok(None)` with a note for a protocol the dataplane does not translate.
fn port(
    p: &ServicePort,
    i: usize,
    node_ports: bool,
    node: &NodeInfo,
    note: &mut dyn FnMut(String),
) -> Result<Option<PortSpec>, String> {
    let name = p.name.clone().unwrap_or_default();
    let port = u16::try_from(p.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(format!("port {} is not within 1-65535", p.port))?;
    let node_port = match p.node_port {
        None | Some(0) => None,
        Some(np) => {
            let (lo, hi) = node.node_port_range;
            let np = u16::try_from(np).ok().filter(|np| (lo..=hi).contains(np));
            Some(np.ok_or(format!(
                "ports[{i}].nodePort {} is outside the NodePort range {lo}-{hi}",
                p.node_port.unwrap_or(0)
            ))?)
        }
    };
    let l4 = match protocol(p.protocol.as_deref()) {
        Ok(l4) => l4,
        Err(e) => {
            note(format!("port {port} ({name:?}): {e}"));
            return Ok(None);
        }
    };
    Ok(Some(PortSpec { name, port, l4, node_port: node_port.filter(|_| node_ports) }))
}

/// kube-proxy's implicit allows: when the ranges hold one of this node's
/// addresses, the node's addresses and the Service's LoadBalancer IPs are
/// allowed too (a node that holds a VIP sends to it from the VIP itself).
fn implicit_allows(ranges: &[Ipv4Net], node: &[IpAddr], lb_ips: &[IpAddr]) -> Vec<Ipv4Net> {
    let v4 = |a: &IpAddr| match a {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    };
    let holds_node = ranges.iter().any(|r| node.iter().filter_map(v4).any(|a| r.contains(&a)));
    if !holds_node {
        return Vec::new();
    }
    let extra = node.iter().chain(lb_ips).filter_map(v4).filter(|a| !ranges.iter().any(|r| r.contains(a)));
    extra.map(Ipv4Net::from).collect::<std::collections::BTreeSet<_>>().into_iter().collect()
}
