//! Services, EndpointSlices and this node's Node object from the API server,
//! through kube-rs reflectors with kube-proxy's label filters.
//!
//! The watchers relist after a 410 Gone, retry with backoff when the API
//! server is away, and the stores keep the last known state meanwhile, so
//! the node keeps forwarding with it.

use std::{collections::BTreeMap, fmt::Debug, net::IpAddr};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice},
    serde::de::DeserializeOwned,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt as _, reflector, reflector::Store, watcher},
};
use tokio::sync::mpsc;
use tracing::warn;

use crate::model::{ClusterState, LABEL_HEADLESS, LABEL_PROXY_NAME, object_ref};

pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// Live views of the cluster objects the agent needs.
#[derive(Clone)]
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Store<Node>,
}

/// What the Node object says about this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub zone: Option<String>,
    pub addresses: Vec<IpAddr>,
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
                Api::all(client),
                watcher::Config::default().fields(&format!("metadata.name={node_name}")),
                changed,
            ),
        }
    }

    /// Resolves once every watch has completed its first list: the first
    /// full sync, before which nothing may be pruned.
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
        NodeFacts { zone, addresses: addresses.into_values().flatten().collect() }
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
                Err(e) => {
                    warn!(kind = %K::kind(&Default::default()), error = %e, "watch failed; retrying with backoff")
                }
            }
        }
    });
    reader
}
