//! kube-proxy's semantics as a pure function: Services and EndpointSlices,
//! plus this node's identity, in; the frontends and backends the dataplane
//! must hold, out. No I/O here, so it is tested with golden files.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use lb_common::{FrontendKey, FrontendKind, IPPROTO_TCP, IPPROTO_UDP};

/// Services carrying this label belong to another proxy.
pub const LABEL_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Set on the endpoints of headless services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// `namespace/name`.
pub type ObjectRef = String;

pub fn object_ref(meta: &ObjectMeta) -> ObjectRef {
    format!("{}/{}", meta.namespace.as_deref().unwrap_or("default"), meta.name.as_deref().unwrap_or(""))
}

/// The node the agent programs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub zone: Option<String>,
    pub addresses: Vec<Ipv4Addr>,
}

/// Everything the sources currently know, keyed by `namespace/name`.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub services: BTreeMap<ObjectRef, Service>,
    pub slices: BTreeMap<ObjectRef, EndpointSlice>,
}

/// A pod endpoint as the dataplane sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DesiredBackend {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// On this node: reachable without SNAT.
    pub local: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    pub service: ObjectRef,
    pub port_name: String,
    pub kind: FrontendKind,
    /// Endpoints new connections may use, sorted.
    pub backends: Vec<DesiredBackend>,
    /// Endpoints still present but not for new connections (not ready,
    /// terminating, or filtered by traffic policy): kept so that their
    /// established flows continue.
    pub standby: Vec<DesiredBackend>,
    /// sessionAffinity ClientIP timeout.
    pub affinity_timeout: Option<u32>,
    /// loadBalancerSourceRanges (LoadBalancer ingress frontends only).
    pub source_ranges: Vec<Ipv4Net>,
    /// Traffic policy Local while the service has endpoints elsewhere:
    /// with no local endpoint, drop instead of reject.
    pub local_only: bool,
}

/// A problem with one object, reported and otherwise ignored.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Note {
    pub object: String,
    pub message: String,
}

/// A healthCheckNodePort to serve (LoadBalancer, externalTrafficPolicy Local).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Endpoints on this node that take new connections.
    pub local_endpoints: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<FrontendKey, DesiredFrontend>,
    /// healthCheckNodePort → what to answer there.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    pub notes: Vec<Note>,
}

/// One endpoint of one service port, with its conditions.
#[derive(Clone, Copy, Debug)]
struct Endpoint {
    backend: DesiredBackend,
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// The dataplane state kube-proxy's rules would give `state` on `node`.
pub fn desired_state(state: &ClusterState, node: &NodeInfo) -> Desired {
    let mut desired = Desired::default();
    let slices = slices_by_service(state, &mut desired.notes);
    for (name, svc) in &state.services {
        let empty = Vec::new();
        service(name, svc, slices.get(name).unwrap_or(&empty), node, &mut desired);
    }
    desired.notes.sort();
    desired.notes.dedup();
    desired
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

fn slices_by_service<'a>(
    state: &'a ClusterState,
    notes: &mut Vec<Note>,
) -> BTreeMap<ObjectRef, Vec<&'a EndpointSlice>> {
    let mut by_service: BTreeMap<ObjectRef, Vec<&EndpointSlice>> = BTreeMap::new();
    for (name, slice) in &state.slices {
        let meta = &slice.metadata;
        if label(meta, LABEL_PROXY_NAME).is_some() || label(meta, LABEL_HEADLESS).is_some() {
            continue;
        }
        let Some(service) = label(meta, LABEL_SERVICE_NAME) else {
            notes.push(Note {
                object: name.clone(),
                message: format!("no {LABEL_SERVICE_NAME} label: ignored"),
            });
            continue;
        };
        match slice.address_type.as_str() {
            "IPv4" => {}
            "IPv6" => {
                notes.push(Note {
                    object: name.clone(),
                    message: "IPv6 endpoints wait for the IPv6 dataplane: not programmed".into(),
                });
                continue;
            }
            other => {
                notes.push(Note { object: name.clone(), message: format!("addressType {other}: ignored") });
                continue;
            }
        }
        let ns = meta.namespace.as_deref().unwrap_or("default");
        by_service.entry(format!("{ns}/{service}")).or_default().push(slice);
    }
    by_service
}

fn protocol(p: Option<&str>) -> Result<u8, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(IPPROTO_TCP),
        "UDP" => Ok(IPPROTO_UDP),
        "SCTP" => Err("SCTP is not programmed yet (the dataplane handles TCP and UDP)".into()),
        other => Err(format!("unknown protocol {other}")),
    }
}

/// The endpoints of the service port named `port_name`, matched by name and
/// protocol to the slices' ports, which carry the resolved target port.
fn endpoints(slices: &[&EndpointSlice], port_name: &str, proto: u8, node: &NodeInfo) -> Vec<Endpoint> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for slice in slices {
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name && protocol(p.protocol.as_deref()) == Ok(proto)
        }) else {
            continue;
        };
        let Some(port) = port.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
            continue;
        };
        for ep in &slice.endpoints {
            // kube-proxy uses the first address of an endpoint.
            let Some(addr) = ep.addresses.first().and_then(|a| a.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            let local = ep.node_name.as_deref() == Some(node.name.as_str());
            let backend = DesiredBackend { addr, port, local };
            if !seen.insert((addr, port)) {
                continue;
            }
            let c = ep.conditions.as_ref();
            out.push(Endpoint {
                backend,
                ready: c.and_then(|c| c.ready).unwrap_or(true),
                serving: c.and_then(|c| c.serving).unwrap_or(true),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            });
        }
    }
    out
}

/// kube-proxy's choice: ready endpoints; when none is ready, those still
/// serving while terminating.
fn usable<'a>(eps: impl Iterator<Item = &'a Endpoint> + Clone) -> Vec<DesiredBackend> {
    let mut ready: Vec<_> = eps.clone().filter(|e| e.ready).map(|e| e.backend).collect();
    if ready.is_empty() {
        ready = eps.filter(|e| e.serving && e.terminating).map(|e| e.backend).collect();
    }
    ready.sort();
    ready
}

fn service(name: &str, svc: &Service, slices: &[&EndpointSlice], node: &NodeInfo, d: &mut Desired) {
    let note = |d: &mut Desired, message: String| d.notes.push(Note { object: name.to_string(), message });
    if let Some(proxy) = label(&svc.metadata, LABEL_PROXY_NAME) {
        note(d, format!("handled by service proxy {proxy:?}: skipped"));
        return;
    }
    let Some(spec) = &svc.spec else {
        note(d, "no spec: skipped".into());
        return;
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return;
    }
    let mut cluster_ips: Vec<&str> = spec.cluster_ips.iter().flatten().map(String::as_str).collect();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip.as_deref());
    }
    if cluster_ips.contains(&"None") {
        return; // headless: DNS only
    }
    let v4 = |d: &mut Desired, what: &str, ip: &str| -> Option<Ipv4Addr> {
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(a)) => Some(a),
            Ok(std::net::IpAddr::V6(_)) => {
                note(d, format!("{what} {ip}: IPv6 waits for the IPv6 dataplane, not programmed"));
                None
            }
            Err(_) => {
                note(d, format!("{what} {ip:?} is not an IP address: ignored"));
                None
            }
        }
    };
    let cluster_ips: Vec<Ipv4Addr> = cluster_ips.iter().filter_map(|ip| v4(d, "clusterIP", ip)).collect();
    let external_ips: Vec<Ipv4Addr> =
        spec.external_ips.iter().flatten().filter_map(|ip| v4(d, "externalIP", ip)).collect();
    let mut lb_ips = Vec::new();
    if svc_type == "LoadBalancer" {
        for ing in svc
            .status
            .iter()
            .filter_map(|s| s.load_balancer.as_ref())
            .flat_map(|lb| lb.ingress.iter().flatten())
        {
            // ipMode Proxy: the cloud load balancer proxies; traffic never
            // arrives addressed to the VIP.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(ip) = ing.ip.as_deref().and_then(|ip| v4(d, "load balancer ingress", ip)) {
                lb_ips.push(ip);
            }
        }
    }
    let mut source_ranges = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        match r.trim().parse::<Ipv4Net>() {
            Ok(net) => source_ranges.push(net.trunc()),
            Err(_) if r.contains(':') => {}
            Err(_) => note(d, format!("loadBalancerSourceRanges entry {r:?} is not a CIDR: ignored")),
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
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let node_ports = matches!(svc_type, "NodePort" | "LoadBalancer");
    let health_port = spec.health_check_node_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0);
    let mut local_ready = BTreeSet::new();

    for port in spec.ports.iter().flatten() {
        let port_name = port.name.clone().unwrap_or_default();
        let proto = match protocol(port.protocol.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                note(d, format!("port {} ({port_name:?}): {e}", port.port));
                continue;
            }
        };
        let Ok(svc_port) = u16::try_from(port.port) else {
            note(d, format!("port {} is out of range: ignored", port.port));
            continue;
        };
        let eps = endpoints(slices, &port_name, proto, node);
        let cluster = usable(eps.iter());
        let local = usable(eps.iter().filter(|e| e.backend.local));
        local_ready.extend(local.iter().map(|b| b.addr));
        let any_usable = !cluster.is_empty() || !local.is_empty();
        let all: Vec<DesiredBackend> = eps.iter().map(|e| e.backend).collect();

        let make = |kind, local_policy: bool, ranges: &[Ipv4Net]| {
            let backends = if local_policy { local.clone() } else { cluster.clone() };
            let mut standby: Vec<_> = all.iter().filter(|b| !backends.contains(b)).copied().collect();
            standby.sort();
            DesiredFrontend {
                service: name.to_string(),
                port_name: port_name.clone(),
                kind,
                backends,
                standby,
                affinity_timeout,
                source_ranges: ranges.to_vec(),
                local_only: local_policy && any_usable,
            }
        };
        let add = |d: &mut Desired, key: FrontendKey, fe: DesiredFrontend| match d.frontends.get(&key) {
            Some(other) => d.notes.push(Note {
                object: name.to_string(),
                message: format!(
                    "{} {} is already used by {} ({}): not programmed",
                    fe.kind.as_str(),
                    frontend_str(&key),
                    other.service,
                    other.kind.as_str()
                ),
            }),
            None => {
                d.frontends.insert(key, fe);
            }
        };
        for ip in &cluster_ips {
            add(
                d,
                FrontendKey::new(ip.octets(), svc_port, proto),
                make(FrontendKind::ClusterIp, internal_local, &[]),
            );
        }
        if node_ports && let Some(np) = port.node_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0)
        {
            add(d, FrontendKey::new([0; 4], np, proto), make(FrontendKind::NodePort, external_local, &[]));
        }
        for ip in &external_ips {
            add(
                d,
                FrontendKey::new(ip.octets(), svc_port, proto),
                make(FrontendKind::ExternalIp, external_local, &[]),
            );
        }
        for ip in &lb_ips {
            add(
                d,
                FrontendKey::new(ip.octets(), svc_port, proto),
                make(FrontendKind::LoadBalancer, external_local, &source_ranges),
            );
        }
    }
    // kube-proxy serves it for LoadBalancer services with policy Local: the
    // cloud load balancer sends traffic only to nodes answering 200.
    if svc_type == "LoadBalancer"
        && external_local
        && let Some(port) = health_port
    {
        add_health_check(d, name, svc, port, local_ready.len());
    }
}

fn add_health_check(d: &mut Desired, name: &str, svc: &Service, port: u16, local_endpoints: usize) {
    if let Some(other) = d.health_checks.get(&port) {
        let message =
            format!("healthCheckNodePort {port} is already served for {}/{}", other.namespace, other.name);
        d.notes.push(Note { object: name.to_string(), message });
        return;
    }
    let namespace = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let service = svc.metadata.name.clone().unwrap_or_default();
    d.health_checks.insert(port, HealthCheck { namespace, name: service, local_endpoints });
}

pub fn frontend_str(key: &FrontendKey) -> String {
    let proto = match key.proto {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        _ => "?",
    };
    if key.addr == [0; 4] {
        format!("*:{}/{proto}", key.port)
    } else {
        format!("{}:{}/{proto}", Ipv4Addr::from(key.addr), key.port)
    }
}

impl Desired {
    /// A stable, human-readable dump (golden files, `--dry-run`).
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for (key, fe) in &self.frontends {
            let _ = write!(out, "{} {} {}", frontend_str(key), fe.kind.as_str(), fe.service);
            if !fe.port_name.is_empty() {
                let _ = write!(out, " port={}", fe.port_name);
            }
            if let Some(t) = fe.affinity_timeout {
                let _ = write!(out, " affinity=ClientIP/{t}s");
            }
            if fe.local_only {
                let _ = write!(out, " local-only");
            }
            if !fe.source_ranges.is_empty() {
                let ranges: Vec<String> = fe.source_ranges.iter().map(|r| r.to_string()).collect();
                let _ = write!(out, " source-ranges={}", ranges.join(","));
            }
            out.push('\n');
            if fe.backends.is_empty() {
                let action = if fe.local_only { "drop" } else { "reject" };
                let _ = writeln!(out, "  (no endpoints: {action})");
            }
            for b in &fe.backends {
                let _ = writeln!(out, "  -> {}:{}{}", b.addr, b.port, if b.local { " local" } else { "" });
            }
            for b in &fe.standby {
                let _ = writeln!(out, "  .. {}:{} (existing flows only)", b.addr, b.port);
            }
        }
        for (port, hc) in &self.health_checks {
            let _ = writeln!(
                out,
                "healthCheckNodePort {port} {}/{}: {} local endpoint(s)",
                hc.namespace, hc.name, hc.local_endpoints
            );
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {}: {}", n.object, n.message);
        }
        out
    }
}
