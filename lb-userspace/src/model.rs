//! kube-proxy's semantics as a pure function: Services and EndpointSlices,
//! plus this node's identity, in; the frontends and backends the dataplane
//! must hold, out. No I/O here, so it is tested with golden files.
//!
//! Each Service is derived on its own (`derive`); clashes between Services
//! over a frontend are settled by name order. The agent keeps a `Model`,
//! which derives again only the Services whose objects changed.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    net::Ipv4Addr,
    sync::Arc,
};

use ipnet::Ipv4Net;
use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use lb_common::{FrontendKey, FrontendKind, IPPROTO_TCP, IPPROTO_UDP};

use crate::sorted::diff;

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

/// Everything the sources currently know, keyed by `namespace/name`. Shared
/// objects: an unchanged object keeps its allocation from one state to the
/// next, which lets `Model` skip it cheaply.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub services: BTreeMap<ObjectRef, Arc<Service>>,
    pub slices: BTreeMap<ObjectRef, Arc<EndpointSlice>>,
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
    /// Shared with the `Model` that derived them: an unchanged frontend is
    /// the same allocation from one state to the next.
    pub frontends: BTreeMap<FrontendKey, Arc<DesiredFrontend>>,
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
    Model::default().desired(state, node).clone()
}

/// `desired_state`, kept up to date between calls at the cost of what
/// changed: objects are compared with those of the last call (by allocation,
/// then by value), only the Services whose objects changed are derived
/// again, and only the frontends they claim are settled again.
#[derive(Debug, Default)]
pub struct Model {
    node: NodeInfo,
    services: BTreeMap<ObjectRef, Memo>,
    slices: BTreeMap<ObjectRef, SliceEntry>,
    /// Each Service's slices, by slice name.
    by_service: HashMap<ObjectRef, BTreeMap<ObjectRef, Arc<EndpointSlice>>>,
    /// Every Service that asks for a frontend (or health check port); the
    /// first by name holds it, as when kube-proxy walks them in order.
    claims: HashMap<FrontendKey, BTreeSet<ObjectRef>>,
    health_claims: HashMap<u16, BTreeSet<ObjectRef>>,
    desired: Desired,
}

#[derive(Debug)]
struct Memo {
    service: Arc<Service>,
    out: Derived,
}

#[derive(Debug)]
struct SliceEntry {
    slice: Arc<EndpointSlice>,
    /// The Service it belongs to, or why it is ignored.
    owner: Result<ObjectRef, Option<String>>,
}

fn same<T: PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

impl Model {
    pub fn desired(&mut self, state: &ClusterState, node: &NodeInfo) -> &Desired {
        if *node != self.node {
            *self = Self { node: node.clone(), ..Default::default() };
        }
        // Services to derive again: changed themselves, or their slices did.
        let mut dirty: BTreeSet<ObjectRef> = BTreeSet::new();
        let mut slice_changes = Vec::new();
        diff(
            &self.slices,
            &state.slices,
            |e, s| same(&e.slice, s),
            |name, old, new| slice_changes.push((name.clone(), old.map(|e| e.owner.clone()), new.cloned())),
        );
        for (name, old_owner, new) in slice_changes {
            if let Some(Ok(service)) = old_owner {
                if let Some(slices) = self.by_service.get_mut(&service) {
                    slices.remove(&name);
                }
                dirty.insert(service);
            }
            match new {
                Some(slice) => {
                    let owner = slice_owner(&slice);
                    if let Ok(service) = &owner {
                        self.by_service
                            .entry(service.clone())
                            .or_default()
                            .insert(name.clone(), slice.clone());
                        dirty.insert(service.clone());
                    }
                    self.slices.insert(name, SliceEntry { slice, owner });
                }
                None => {
                    self.slices.remove(&name);
                }
            }
        }
        diff(
            &self.services,
            &state.services,
            |m, s| same(&m.service, s),
            |name, _, _| {
                dirty.insert(name.clone());
            },
        );

        let mut touched = BTreeSet::new();
        let mut touched_ports = BTreeSet::new();
        for name in dirty {
            if let Some(old) = self.services.remove(&name) {
                for (key, _) in &old.out.frontends {
                    release(&mut self.claims, *key, &name);
                    touched.insert(*key);
                }
                if let Some((port, _)) = old.out.health_check {
                    release(&mut self.health_claims, port, &name);
                    touched_ports.insert(port);
                }
            }
            let Some(service) = state.services.get(&name) else { continue };
            let slices: Vec<Arc<EndpointSlice>> =
                self.by_service.get(&name).map(|s| s.values().cloned().collect()).unwrap_or_default();
            let out = derive(&name, service, &slices, node);
            for (key, _) in &out.frontends {
                self.claims.entry(*key).or_default().insert(name.clone());
                touched.insert(*key);
            }
            if let Some((port, _)) = out.health_check {
                self.health_claims.entry(port).or_default().insert(name.clone());
                touched_ports.insert(port);
            }
            self.services.insert(name, Memo { service: service.clone(), out });
        }
        self.by_service.retain(|_, slices| !slices.is_empty());

        for key in touched {
            match self.claims.get(&key).and_then(|c| c.first()) {
                Some(holder) => {
                    let fe = self.services[holder].out.frontend(&key).expect("a claim has its frontend");
                    self.desired.frontends.insert(key, fe.clone());
                }
                None => {
                    self.desired.frontends.remove(&key);
                }
            }
        }
        for port in touched_ports {
            match self.health_claims.get(&port).and_then(|c| c.first()) {
                Some(holder) => {
                    let check = self.services[holder].out.health_check.as_ref().expect("claimed").1.clone();
                    self.desired.health_checks.insert(port, check);
                }
                None => {
                    self.desired.health_checks.remove(&port);
                }
            }
        }
        self.desired.notes = self.notes();
        &self.desired
    }

    /// Every object's notes, and one for each frontend or health check port
    /// a Service asks for but another holds.
    fn notes(&self) -> Vec<Note> {
        let mut notes: Vec<Note> = self
            .slices
            .iter()
            .filter_map(|(name, e)| match &e.owner {
                Err(Some(message)) => Some(Note { object: name.clone(), message: message.clone() }),
                _ => None,
            })
            .collect();
        for memo in self.services.values() {
            notes.extend(memo.out.notes.iter().cloned());
        }
        for (key, claims) in self.claims.iter().filter(|(_, c)| c.len() > 1) {
            let holder = claims.first().expect("claimed");
            let held = self.services[holder].out.frontend(key).expect("a claim has its frontend");
            for other in claims.iter().skip(1) {
                let fe = self.services[other].out.frontend(key).expect("a claim has its frontend");
                notes.push(Note {
                    object: other.clone(),
                    message: format!(
                        "{} {} is already used by {holder} ({}): not programmed",
                        fe.kind.as_str(),
                        frontend_str(key),
                        held.kind.as_str()
                    ),
                });
            }
        }
        for (port, claims) in self.health_claims.iter().filter(|(_, c)| c.len() > 1) {
            let holder = claims.first().expect("claimed");
            let held = &self.services[holder].out.health_check.as_ref().expect("claimed").1;
            for other in claims.iter().skip(1) {
                notes.push(Note {
                    object: other.clone(),
                    message: format!(
                        "healthCheckNodePort {port} is already served for {}/{}",
                        held.namespace, held.name
                    ),
                });
            }
        }
        notes.sort();
        notes.dedup();
        notes
    }
}

fn release<K: std::hash::Hash + Eq>(claims: &mut HashMap<K, BTreeSet<ObjectRef>>, key: K, name: &str) {
    if let Some(c) = claims.get_mut(&key) {
        c.remove(name);
        if c.is_empty() {
            claims.remove(&key);
        }
    }
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

/// The Service a slice serves (`namespace/name`), or why it is left out:
/// another proxy's or a headless service's (silently), or a note.
fn slice_owner(slice: &EndpointSlice) -> Result<ObjectRef, Option<String>> {
    let meta = &slice.metadata;
    if label(meta, LABEL_PROXY_NAME).is_some() || label(meta, LABEL_HEADLESS).is_some() {
        return Err(None);
    }
    let Some(service) = label(meta, LABEL_SERVICE_NAME) else {
        return Err(Some(format!("no {LABEL_SERVICE_NAME} label: ignored")));
    };
    match slice.address_type.as_str() {
        "IPv4" => {}
        "IPv6" => return Err(Some("IPv6 endpoints wait for the IPv6 dataplane: not programmed".into())),
        other => return Err(Some(format!("addressType {other}: ignored"))),
    }
    let ns = meta.namespace.as_deref().unwrap_or("default");
    Ok(format!("{ns}/{service}"))
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
fn endpoints(slices: &[Arc<EndpointSlice>], port_name: &str, proto: u8, node: &NodeInfo) -> Vec<Endpoint> {
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

/// What one Service asks for, before clashes with other Services are settled.
#[derive(Debug, Default)]
struct Derived {
    frontends: Vec<(FrontendKey, Arc<DesiredFrontend>)>,
    health_check: Option<(u16, HealthCheck)>,
    notes: Vec<Note>,
}

impl Derived {
    fn frontend(&self, key: &FrontendKey) -> Option<&Arc<DesiredFrontend>> {
        self.frontends.iter().find(|(k, _)| k == key).map(|(_, fe)| fe)
    }
}

fn derive(name: &str, svc: &Service, slices: &[Arc<EndpointSlice>], node: &NodeInfo) -> Derived {
    let mut d = Derived::default();
    service(name, svc, slices, node, &mut d);
    d
}

fn service(name: &str, svc: &Service, slices: &[Arc<EndpointSlice>], node: &NodeInfo, d: &mut Derived) {
    let note = |d: &mut Derived, message: String| d.notes.push(Note { object: name.to_string(), message });
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
    let v4 = |d: &mut Derived, what: &str, ip: &str| -> Option<Ipv4Addr> {
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
        // A Service naming one frontend twice keeps the first.
        let add = |d: &mut Derived, key: FrontendKey, fe: DesiredFrontend| match d.frontend(&key) {
            Some(other) => {
                let message = format!(
                    "{} {} is already used by {} ({}): not programmed",
                    fe.kind.as_str(),
                    frontend_str(&key),
                    other.service,
                    other.kind.as_str()
                );
                d.notes.push(Note { object: name.to_string(), message });
            }
            None => d.frontends.push((key, Arc::new(fe))),
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
        let namespace = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let service = svc.metadata.name.clone().unwrap_or_default();
        d.health_check =
            Some((port, HealthCheck { namespace, name: service, local_endpoints: local_ready.len() }));
    }
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
