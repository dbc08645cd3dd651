//! One node's dataplane kept in line with the cluster: the model (what
//! should be programmed), the reconciler's record (what is), and the maps.
//! The agent runs it on the pinned kernel maps; tests run it on a
//! `MemoryStore`, restarts and all.

use anyhow::{Context as _, Result};
use tracing::debug;

use crate::{
    model::{ClusterState, Desired, Model, NodeInfo},
    reconciler::{self, MapStore, NodeSettings, Reconciler, Summary},
};

pub struct Dataplane<S: MapStore> {
    pub store: S,
    model: Model,
    reconciler: Reconciler,
}

impl<S: MapStore> Dataplane<S> {
    /// Takes over what `store` holds (an earlier run's pins): nothing is
    /// changed until the first sync, which prunes what is stale, except
    /// what pins of an older version lack (`Reconciler::backfill`).
    pub fn adopt(mut store: S) -> Result<Self> {
        let programmed = store.dump().context("reading the programmed maps")?;
        let mut reconciler =
            Reconciler::adopt_with(&programmed, limits(&store)).context("adopting the programmed maps")?;
        reconciler::apply(&mut store, &reconciler.backfill(&programmed))
            .context("completing the adopted maps")?;
        Ok(Self { store, model: Model::default(), reconciler })
    }

    /// Brings the maps in line with `state`; returns how many writes that
    /// took. After a failed write the record is read again from the maps,
    /// so the next sync plans from what is really there.
    pub fn sync(&mut self, state: &ClusterState, node: &NodeInfo, settings: &NodeSettings) -> Result<usize> {
        let desired = self.model.desired(state, node);
        let (reconciler, store) = (&mut self.reconciler, &mut self.store);
        let mut plan = || -> Result<(usize, bool)> {
            let ops = reconciler.plan(desired, settings)?;
            for op in &ops {
                debug!(?op, "map change");
            }
            reconciler::apply(store, &ops)?;
            Ok((ops.len(), !reconciler.overflow().is_empty()))
        };
        // What did not fit may fit now that this plan's deletions are done.
        let applied =
            plan().and_then(|(n, overflow)| if n > 0 && overflow { Ok(n + plan()?.0) } else { Ok(n) });
        if applied.is_err() {
            let programmed = self.store.dump().context("re-reading the maps after a failed sync")?;
            self.reconciler = Reconciler::adopt_with(&programmed, limits(&self.store))?;
        }
        applied
    }

    /// Desired frontends not programmed, their maps being full.
    pub fn overflow(&self) -> &std::collections::BTreeMap<crate::frontend::Frontend, reconciler::StoreError> {
        self.reconciler.overflow()
    }

    /// The desired state of the last sync.
    pub fn desired(&self) -> &Desired {
        self.model.current()
    }

    pub fn live_backends(&self) -> crate::socket_lb::LiveBackends {
        self.reconciler.live_backends()
    }

    pub fn summary(&self) -> Summary {
        self.reconciler.summary()
    }
}

fn limits(store: &impl MapStore) -> reconciler::Limits {
    reconciler::Limits::from_capacity(|m| store.capacity(m).unwrap_or(m.capacity()))
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, net::IpAddr};

    use super::*;
    use crate::reconciler::{MemoryStore, Op, Programmed, StoreError};

    /// A store whose writes fail while `failing` is set.
    struct Flaky {
        inner: MemoryStore,
        failing: bool,
    }

    impl MapStore for Flaky {
        fn apply(&mut self, op: &Op) -> Result<(), StoreError> {
            if self.failing && matches!(op, Op::PutFrontend(..)) {
                return Err(StoreError::Write { map: "lb_services", source: anyhow::anyhow!("injected") });
            }
            self.inner.apply(op)
        }
        fn dump(&self) -> Result<Programmed, StoreError> {
            self.inner.dump()
        }
        fn capacity(&self, map: &lb_common::registry::MapDef) -> Option<u32> {
            self.inner.capacity(map)
        }
    }

    fn state() -> ClusterState {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: ["10.244.1.5"]}, {addresses: ["10.244.2.6"]}]
"#;
        let mut loaded = crate::sources::manifests::Loaded::default();
        crate::sources::manifests::parse_into(std::path::Path::new("web.yaml"), yaml, &mut loaded);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        loaded.state
    }

    fn node() -> (NodeInfo, NodeSettings) {
        let addr: IpAddr = [192, 0, 2, 11].into();
        let info =
            NodeInfo { name: "node-1".into(), zone: None, addresses: vec![addr], ..Default::default() };
        (
            info,
            NodeSettings {
                addresses: BTreeSet::from([addr]),
                snat_addr: addr,
                nat_ports: (61000, 65535),
                via_stack: false,
                service_cidrs: Vec::new(),
            },
        )
    }

    #[test]
    fn a_failed_sync_is_planned_again_from_the_maps() {
        let (info, settings) = node();
        let mut dp = Dataplane::adopt(Flaky { inner: MemoryStore::default(), failing: true }).unwrap();
        assert!(dp.sync(&state(), &info, &settings).is_err());
        // Backends and slots went in before the frontend failed.
        assert!(!dp.store.inner.maps.backends.is_empty() && dp.store.inner.maps.services.is_empty());
        dp.store.failing = false;
        let ops = dp.sync(&state(), &info, &settings).unwrap();
        assert!(ops > 0);
        assert_eq!(dp.store.inner.maps.services.len(), 1);
        assert_eq!(dp.sync(&state(), &info, &settings).unwrap(), 0, "in line: nothing more to do");
    }
}
