//! kube-proxy's semantics as a pure function: Services and EndpointSlices,
//! plus this node's identity, in; the frontends and backends the dataplane
//! must hold, out. No I/O here, so it is tested with golden files.
//!
//! Each Service is derived on its own (`derive`): parsed into a spec
//! (`spec`), then each port's endpoints (`endpoints`) and frontends
//! (`frontends`). Clashes between Services over a frontend are settled by
//! name order. The agent keeps a `Model`, which derives again only the
//! Services whose objects changed.

mod dump;
mod endpoints;
mod frontends;
pub mod spec;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use ipnet::Ipv4Net;
use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

pub use self::{dump::printable, spec::DEFAULT_AFFINITY_TIMEOUT};
use crate::{
    frontend::{Frontend, FrontendKind},
    sorted::diff,
};

/// Services carrying this label belong to another proxy.
pub const LABEL_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Set on the endpoints of headless services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// `namespace/name`.
pub type ObjectRef = String;

pub fn object_ref(meta: &ObjectMeta) -> ObjectRef {
    format!("{}/{}", meta.namespace.as_deref().unwrap_or("default"), meta.name.as_deref().unwrap_or(""))
}

/// The node the agent programs, and the cluster's settings it is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub zone: Option<String>,
    pub addresses: Vec<IpAddr>,
    /// The API server's service-node-port-range.
    pub node_port_range: (u16, u16),
    /// externalIPs allowed (all when empty): the CVE-2020-8554 guard.
    pub external_ip_cidrs: Vec<ipnet::IpNet>,
}

/// Kubernetes' default service-node-port-range.
pub const DEFAULT_NODE_PORT_RANGE: (u16, u16) = (30000, 32767);

impl Default for NodeInfo {
    fn default() -> Self {
        Self {
            name: String::new(),
            zone: None,
            addresses: Vec::new(),
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            external_ip_cidrs: Vec::new(),
        }
    }
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
    pub addr: IpAddr,
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
    /// Endpoints still serving but not for new connections (terminating,
    /// or filtered by traffic policy or topology): kept so that their
    /// established UDP flows stay.
    pub standby: Vec<DesiredBackend>,
    /// sessionAffinity ClientIP timeout.
    pub affinity_timeout: Option<u32>,
    /// loadBalancerSourceRanges (LoadBalancer ingress frontends only).
    pub source_ranges: Vec<Ipv4Net>,
    /// Traffic policy Local while the service has endpoints elsewhere:
    /// with no local endpoint, drop instead of reject.
    pub local_only: bool,
    /// An external frontend whose in-cluster clients use its
    /// `Scope::Internal` twin (externalTrafficPolicy Local).
    pub two_scopes: bool,
}

impl DesiredFrontend {
    /// A frontend of `kind` serving `service` with `backends` and nothing
    /// else: no port name, standby endpoints, affinity, source ranges or
    /// traffic policy.
    pub fn new(service: &str, kind: FrontendKind, mut backends: Vec<DesiredBackend>) -> Self {
        backends.sort();
        Self {
            service: service.into(),
            port_name: String::new(),
            kind,
            backends,
            standby: Vec::new(),
            affinity_timeout: None,
            source_ranges: Vec::new(),
            local_only: false,
            two_scopes: false,
        }
    }
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
    pub frontends: BTreeMap<Frontend, Arc<DesiredFrontend>>,
    /// healthCheckNodePort → what to answer there.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    pub notes: Vec<Note>,
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
    claims: HashMap<Frontend, BTreeSet<ObjectRef>>,
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
    /// The desired state of the last call.
    pub fn current(&self) -> &Desired {
        &self.desired
    }

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
                        "{} {key} is already used by {holder} ({}): not programmed",
                        fe.kind.as_str(),
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

pub(crate) fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
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
    // What the API server refuses it would not have stored.
    for ep in &slice.endpoints {
        for a in &ep.addresses {
            if !a.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| !ip.is_unspecified() && !ip.is_loopback()) {
                return Err(Some(format!(
                    "endpoint address {a:?} is not a valid IPv4 endpoint: not programmed"
                )));
            }
        }
    }
    for p in slice.ports.iter().flatten() {
        if let Some(port) = p.port
            && !(1..=65535).contains(&port)
        {
            return Err(Some(format!("port {port} is not within 1-65535: not programmed")));
        }
    }
    let ns = meta.namespace.as_deref().unwrap_or("default");
    Ok(format!("{ns}/{service}"))
}

/// What one Service asks for, before clashes with other Services are settled.
#[derive(Debug, Default)]
struct Derived {
    frontends: Vec<(Frontend, Arc<DesiredFrontend>)>,
    health_check: Option<(u16, HealthCheck)>,
    notes: Vec<Note>,
}

impl Derived {
    fn frontend(&self, key: &Frontend) -> Option<&Arc<DesiredFrontend>> {
        self.frontends.iter().find(|(k, _)| k == key).map(|(_, fe)| fe)
    }
}

fn derive(name: &str, svc: &Service, slices: &[Arc<EndpointSlice>], node: &NodeInfo) -> Derived {
    let mut d = Derived::default();
    let mut notes = Vec::new();
    let spec = spec::parse(svc, node, &mut |message| notes.push(message));
    d.notes.extend(notes.into_iter().map(|message| Note { object: name.to_string(), message }));
    let Some(spec) = spec else { return d };
    let mut local_ready = BTreeSet::new();
    for port in &spec.ports {
        let eps = endpoints::endpoints(slices, &port.name, port.l4, node);
        let (frontends, local) = frontends::port_frontends(name, &spec, port, &eps);
        local_ready.extend(local);
        for (key, fe) in frontends {
            // A Service naming one frontend twice keeps the first.
            match d.frontend(&key) {
                Some(other) => {
                    let message = format!(
                        "{} {key} is already used by {} ({}): not programmed",
                        fe.kind.as_str(),
                        other.service,
                        other.kind.as_str()
                    );
                    d.notes.push(Note { object: name.to_string(), message });
                }
                None => d.frontends.push((key, fe)),
            }
        }
    }
    if let Some(port) = spec.health_check_port {
        let namespace = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let service = svc.metadata.name.clone().unwrap_or_default();
        d.health_check =
            Some((port, HealthCheck { namespace, name: service, local_endpoints: local_ready.len() }));
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::manifests::{Loaded, parse::parse_into};

    fn state(yaml: &str) -> ClusterState {
        let mut loaded = Loaded::default();
        assert!(parse_into(std::path::Path::new("t.yaml"), yaml, &mut loaded));
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        loaded.state
    }

    /// CVE-2020-8554: anyone who may create a Service could otherwise take
    /// over any address with an externalIP.
    #[test]
    fn external_ips_outside_the_allowed_cidrs_are_refused() {
        let state = state(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
             spec: {clusterIP: 10.96.0.10, externalIPs: [203.0.113.7, 198.51.100.9], ports: [{port: 80}]}\n",
        );
        let node = NodeInfo {
            addresses: vec![[192, 0, 2, 11].into()],
            external_ip_cidrs: vec!["203.0.113.0/24".parse().unwrap()],
            ..Default::default()
        };
        let dump = desired_state(&state, &node).dump();
        assert!(dump.contains("203.0.113.7:80/TCP ExternalIP default/web"), "{dump}");
        assert!(!dump.contains("198.51.100.9:80/TCP"), "{dump}");
        assert!(
            dump.contains("note: default/web: externalIP 198.51.100.9 is outside --external-ip-cidrs"),
            "{dump}"
        );
        // Without an allow-list every externalIP is programmed, as kube-proxy does.
        let open = desired_state(&state, &NodeInfo { external_ip_cidrs: Vec::new(), ..node }).dump();
        assert!(open.contains("198.51.100.9:80/TCP ExternalIP default/web"), "{open}");
    }
}
