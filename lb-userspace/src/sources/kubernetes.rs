//! Services, EndpointSlices, this node's Node object and the cluster's
//! ServiceCIDRs from the API server, through kube-rs reflectors with
//! kube-proxy's label filters.
//!
//! The watchers relist after a 410 Gone, retry with backoff when the API
//! server is away, and the stores keep the last known state meanwhile, so
//! the node keeps forwarding with it.

use std::{collections::BTreeMap, fmt::Debug, net::IpAddr};

use futures::StreamExt as _;
use ipnet::Ipv4Net;
use k8s_openapi::{
    api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice, networking::v1::ServiceCIDR},
    serde::de::DeserializeOwned,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt as _, reflector, reflector::Store, watcher},
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::model::{ClusterState, LABEL_HEADLESS, LABEL_PROXY_NAME, object_ref};

pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// Live views of the cluster objects the agent needs.
#[derive(Clone)]
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Store<Node>,
    service_cidrs: Store<ServiceCIDR>,
}

/// What the cluster says about this node: its Node object's zone and
/// addresses, and the cluster's service ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub zone: Option<String>,
    pub addresses: Vec<IpAddr>,
    /// The IPv4 ranges of the ServiceCIDR objects (Kubernetes 1.33+): the
    /// ClusterIP catch-all's, unless `--service-cidr` says otherwise.
    pub service_cidrs: Vec<Ipv4Net>,
}

impl KubeSource {
    /// Starts the watches; `changed` is signalled after every change.
    pub fn start(client: Client, node_name: &str, changed: mpsc::Sender<()>) -> Self {
        // kube-proxy's filters: objects of other proxies, and headless
        // services' endpoints, are none of our business.
        let selector = format!("!{LABEL_PROXY_NAME},!{LABEL_HEADLESS}");
        let filtered = watcher::Config::default().labels(&selector);
        Self {
            services: reflect(Api::all(client.clone()), filtered.clone(), changed.clone()),
            slices: reflect(Api::all(client.clone()), filtered, changed.clone()),
            node: reflect(
                Api::all(client.clone()),
                watcher::Config::default().fields(&format!("metadata.name={node_name}")),
                changed.clone(),
            ),
            service_cidrs: reflect(Api::all(client), watcher::Config::default(), changed),
        }
    }

    /// Resolves once every watch has completed its first list: the first
    /// full sync, before which nothing may be pruned. (Not waiting for the
    /// ServiceCIDRs, which older API servers do not serve: the catch-all
    /// starts when they are listed.)
    pub async fn ready(&self) -> anyhow::Result<()> {
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.node.wait_until_ready().await?;
        Ok(())
    }

    pub fn snapshot(&self) -> ClusterState {
        let services = self.services.state().into_iter().map(|s| (object_ref(&s.metadata), s)).collect();
        let slices = self.slices.state().into_iter().map(|s| (object_ref(&s.metadata), s)).collect();
        ClusterState { services, slices }
    }

    pub fn node(&self) -> NodeFacts {
        let Some(node) = self.node.state().into_iter().next() else { return NodeFacts::default() };
        let zone = node.metadata.labels.as_ref().and_then(|l| l.get(LABEL_ZONE)).cloned();
        let mut addresses: BTreeMap<u8, Vec<IpAddr>> = BTreeMap::new();
        for a in node.status.iter().flat_map(|s| s.addresses.iter().flatten()) {
            let rank = match a.type_.as_str() {
                "InternalIP" => 0,
                "ExternalIP" => 1,
                _ => continue,
            };
            // IPv4 only until the IPv6 maps come.
            if let Ok(ip @ IpAddr::V4(_)) = a.address.parse() {
                addresses.entry(rank).or_default().push(ip);
            }
        }
        let mut service_cidrs: Vec<Ipv4Net> = self
            .service_cidrs
            .state()
            .iter()
            .flat_map(|c| c.spec.iter().flat_map(|s| s.cidrs.iter().flatten()))
            .filter_map(|c| c.parse::<Ipv4Net>().ok())
            .map(|c| c.trunc())
            .collect();
        service_cidrs.sort();
        service_cidrs.dedup();
        NodeFacts { zone, addresses: addresses.into_values().flatten().collect(), service_cidrs }
    }
}

fn reflect<K>(api: Api<K>, config: watcher::Config, changed: mpsc::Sender<()>) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, config)).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    let _ = changed.try_send(());
                }
                // A kind this API server does not serve (ServiceCIDR before
                // 1.33): said once, not retried.
                Err(watcher::Error::InitialListFailed(kube::Error::Api(status))) if status.code == 404 => {
                    info!(kind = %K::kind(&Default::default()), "not served by the API server");
                    return;
                }
                Err(e) => {
                    warn!(kind = %K::kind(&Default::default()), error = %e, "watch failed; retrying with backoff")
                }
            }
        }
    });
    reader
}
