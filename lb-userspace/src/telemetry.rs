//! What the agent tells its operators and the cluster: Prometheus metrics,
//! `/healthz` and `/readyz`, and kube-proxy's healthCheckNodePort answers.
//!
//! Metrics are read from the pinned maps at scrape time (the per-CPU
//! counters are summed), so they cost nothing between scrapes.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use lb_common::{Drop, Event, FrontendKind, registry};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{
    attach,
    maps::Maps,
    model::HealthCheck,
    reconciler::{MapStore as _, keys},
};

/// Sync results, shared between the agent loop and the HTTP servers.
pub struct Telemetry {
    pub pin_dir: PathBuf,
    /// The external interfaces' hooks, and the pinned links whose presence
    /// means the programs are attached (none yet: not attached).
    externals: Mutex<(Vec<attach::External>, Vec<PathBuf>)>,
    pub ready: AtomicBool,
    pub syncs: AtomicU64,
    pub sync_errors: AtomicU64,
    pub frontends: AtomicU64,
    pub backends: AtomicU64,
    /// Objects (or parts) refused at the last sync: manifest errors and
    /// semantic notes.
    pub refused: AtomicU64,
    /// Desired frontends left out at the last sync: a map is full.
    pub unprogrammed: AtomicU64,
    /// Connected UDP sockets destroyed because their backend went away.
    pub sockets_terminated: AtomicU64,
    sync_seconds: Mutex<Histogram>,
}

impl Telemetry {
    pub fn new(pin_dir: PathBuf) -> Arc<Self> {
        let buckets = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0].into_iter();
        Arc::new(Self {
            pin_dir,
            externals: Mutex::new((Vec::new(), Vec::new())),
            ready: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
            sync_errors: AtomicU64::new(0),
            frontends: AtomicU64::new(0),
            backends: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            unprogrammed: AtomicU64::new(0),
            sockets_terminated: AtomicU64::new(0),
            sync_seconds: Mutex::new(Histogram::new(buckets)),
        })
    }

    /// Records which hook each external interface got.
    pub fn attached(&self, pin_dir: &std::path::Path, externals: Vec<attach::External>) {
        let links =
            externals.iter().map(|e| attach::link_pin(pin_dir, e.hook.program(), &e.interface)).collect();
        *self.externals.lock().expect("lock") = (externals, links);
    }

    /// Records a successful sync.
    pub fn synced(&self, elapsed: Duration, frontends: usize, backends: usize) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.sync_seconds.lock().expect("lock").observe(elapsed.as_secs_f64());
        self.frontends.store(frontends as u64, Ordering::Relaxed);
        self.backends.store(backends as u64, Ordering::Relaxed);
        self.ready.store(true, Ordering::Relaxed);
    }

    fn render(&self) -> anyhow::Result<String> {
        let maps = Maps::open_pinned(&self.pin_dir)?;
        let mut reg = Registry::with_prefix("lb");
        let build = Family::<Vec<(String, String)>, Gauge>::default();
        build.get_or_create(&vec![("version".into(), env!("CARGO_PKG_VERSION").into())]).set(1);
        reg.register("build_info", "Agent version", build);

        type Labels = Vec<(String, String)>;
        let packets = Family::<Labels, Counter>::default();
        let bytes = Family::<Labels, Counter>::default();
        let flows = Family::<Labels, Counter>::default();
        let backends = Family::<Labels, Gauge>::default();
        let programmed = maps.dump()?;
        for (key, fe) in &programmed.services {
            let frontend = keys::frontend_of(key);
            let service = programmed
                .names
                .get(&fe.id)
                .map_or("unknown".into(), |n| format!("{}/{}", n.namespace(), n.name()));
            let labels: Labels = vec![
                ("service".into(), service),
                ("frontend".into(), frontend.map_or_else(|| "?".into(), |f| f.address())),
                ("scope".into(), frontend.map_or("?", |f| f.scope.name()).into()),
                ("kind".into(), FrontendKind::from_u8(fe.kind).map_or("?", FrontendKind::as_str).into()),
            ];
            if let Ok(stats) = maps.svc_stats.get(&fe.id, 0) {
                packets.get_or_create(&labels).inc_by(stats.iter().map(|s| s.packets).sum());
                bytes.get_or_create(&labels).inc_by(stats.iter().map(|s| s.bytes).sum());
                flows.get_or_create(&labels).inc_by(stats.iter().map(|s| s.new_flows).sum());
            }
            // The reconciler writes slots before the count that exposes them.
            backends.get_or_create(&labels).set(fe.backend_count as i64);
        }
        reg.register("frontend_packets", "Packets of each service frontend (both directions)", packets);
        reg.register("frontend_bytes", "IP bytes of each service frontend (both directions)", bytes);
        reg.register("frontend_new_connections", "Connections (flows) opened to each frontend", flows);
        reg.register("frontend_backends", "Backends taking new connections, per frontend", backends);

        let drops = Family::<Labels, Counter>::default();
        for reason in Drop::ALL {
            let n: u64 = maps.drops.get(&(reason as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
            drops.get_or_create(&vec![("reason".into(), reason.as_str().into())]).inc_by(n);
        }
        reg.register("drops", "Packets dropped or rejected by the dataplane, by reason", drops);
        let events = Family::<Labels, Counter>::default();
        for event in Event::ALL {
            let n: u64 = maps.events.get(&(event as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
            events.get_or_create(&vec![("event".into(), event.as_str().into())]).inc_by(n);
        }
        reg.register(
            "events",
            "Pressure events: flows recreated mid-stream (evicted or expired entries), NAT ports reclaimed or remapped",
            events,
        );

        // One walk of the LRU gives both its occupancy and the live entries.
        let now = crate::inspect::monotonic_ns();
        let (mut entries, mut live) = (0, 0);
        for (k, e) in maps.conntrack.iter().filter_map(Result::ok) {
            entries += 1;
            live += usize::from(!e.expired(k.proto, now));
        }
        let conntrack = Gauge::<i64>::default();
        conntrack.set(live as i64);
        reg.register("conntrack_entries", "Live conntrack entries (two per flow)", conntrack);
        let used = Family::<Labels, Gauge>::default();
        let capacity = Family::<Labels, Gauge>::default();
        for map in registry::MAPS.iter().filter(|m| m.pinned) {
            let labels = vec![("map".into(), map.name.into())];
            let n = if map.name == registry::CONNTRACK.name { Some(entries) } else { maps.entries(map) };
            if let Some(n) = n {
                used.get_or_create(&labels).set(n as i64);
            }
            if let Some(cap) = maps.capacity(map) {
                capacity.get_or_create(&labels).set(cap as i64);
            }
        }
        reg.register("map_entries", "Entries in each map", used);
        let hooks = Family::<Labels, Gauge>::default();
        for e in &self.externals.lock().expect("lock").0 {
            let labels =
                vec![("interface".into(), e.interface.clone()), ("hook".into(), e.hook.name().into())];
            hooks.get_or_create(&labels).set(1);
        }
        reg.register(
            "external_interface",
            "The hook running the north-south program on each external interface",
            hooks,
        );
        reg.register("map_capacity", "Capacity of each map", capacity);

        let gauge = |v: &AtomicU64| {
            let g = Gauge::<i64>::default();
            g.set(v.load(Ordering::Relaxed) as i64);
            g
        };
        let counter = |v: &AtomicU64| {
            let c = Counter::<u64>::default();
            c.inc_by(v.load(Ordering::Relaxed));
            c
        };
        reg.register("frontends", "Frontends programmed", gauge(&self.frontends));
        reg.register("backends", "Backends programmed", gauge(&self.backends));
        reg.register(
            "refused_objects",
            "Manifest errors and objects (or fields) not programmed at the last sync; the log says which",
            gauge(&self.refused),
        );
        reg.register(
            "unprogrammed_frontends",
            "Desired frontends left out because a map is full; the log names the map and its flag",
            gauge(&self.unprogrammed),
        );
        reg.register("syncs", "Syncs applied", counter(&self.syncs));
        reg.register("sync_errors", "Syncs that failed", counter(&self.sync_errors));
        reg.register(
            "sockets_terminated",
            "Connected UDP sockets destroyed because the backend the socket hooks gave them went away",
            counter(&self.sockets_terminated),
        );
        reg.register(
            "sync_duration_seconds",
            "Time from a change to the maps",
            self.sync_seconds.lock().expect("lock").clone(),
        );
        let mut out = String::new();
        encode(&mut out, &reg)?;
        Ok(out)
    }
}

async fn metrics(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    match tokio::task::spawn_blocking(move || t.render()).await {
        Ok(Ok(text)) => (StatusCode::OK, [("content-type", "text/plain; version=0.0.4")], text),
        Ok(Err(e)) => {
            (StatusCode::INTERNAL_SERVER_ERROR, [("content-type", "text/plain")], format!("{e:#}\n"))
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, [("content-type", "text/plain")], format!("{e}\n")),
    }
}

async fn healthz(State(t): State<Arc<Telemetry>>) -> (StatusCode, &'static str) {
    let attached = {
        let externals = t.externals.lock().expect("lock");
        !externals.1.is_empty() && externals.1.iter().all(|p| p.exists())
    };
    if attached {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "programs not attached\n")
    }
}

async fn readyz(State(t): State<Arc<Telemetry>>) -> (StatusCode, &'static str) {
    if t.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "waiting for the first full sync\n")
    }
}

/// Serves `/metrics` (and the health paths) on `metrics` and the health
/// paths on `health`.
pub async fn serve(
    t: Arc<Telemetry>,
    metrics_addr: SocketAddr,
    health_addr: SocketAddr,
) -> anyhow::Result<()> {
    let health: Router =
        Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).with_state(t.clone());
    let metrics_router: Router =
        Router::new().route("/metrics", get(metrics)).with_state(t).merge(health.clone());
    let bind = |addr: SocketAddr, what: &'static str| async move {
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("serving {what} on {addr}"))
    };
    let m = bind(metrics_addr, "metrics (--metrics-address)").await?;
    let h = bind(health_addr, "health (--health-address)").await?;
    info!(metrics = %metrics_addr, health = %health_addr, "serving metrics and health");
    tokio::spawn(async move { axum::serve(m, metrics_router).await });
    tokio::spawn(async move { axum::serve(h, health).await });
    Ok(())
}

/// kube-proxy's healthCheckNodePort servers, one listener per port.
#[derive(Default)]
pub struct HealthCheckServers {
    running: BTreeMap<u16, (Arc<Mutex<HealthCheck>>, JoinHandle<()>)>,
}

async fn health_check(State(hc): State<Arc<Mutex<HealthCheck>>>) -> impl IntoResponse {
    let hc = hc.lock().expect("lock").clone();
    let body = serde_json::json!({
        "service": {"namespace": hc.namespace, "name": hc.name},
        "localEndpoints": hc.local_endpoints,
        "serviceProxyHealthy": true,
    });
    let status = if hc.local_endpoints > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body))
}

impl HealthCheckServers {
    /// Starts, updates and stops listeners to match `wanted`.
    pub async fn update(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        let gone: Vec<u16> = self.running.keys().filter(|p| !wanted.contains_key(p)).copied().collect();
        for port in gone {
            if let Some((_, task)) = self.running.remove(&port) {
                task.abort();
                info!(port, "healthCheckNodePort closed");
            }
        }
        for (port, hc) in wanted {
            if let Some((state, _)) = self.running.get(port) {
                *state.lock().expect("lock") = hc.clone();
                continue;
            }
            let listener = match tokio::net::TcpListener::bind(("0.0.0.0", *port)).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(port, error = %e, service = %format!("{}/{}", hc.namespace, hc.name), "cannot serve healthCheckNodePort");
                    continue;
                }
            };
            let state = Arc::new(Mutex::new(hc.clone()));
            let app = Router::new().fallback(get(health_check)).with_state(state.clone());
            let task = tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            info!(port, service = %format!("{}/{}", hc.namespace, hc.name), "healthCheckNodePort open");
            self.running.insert(*port, (state, task));
        }
    }
}
