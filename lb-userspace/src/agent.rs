//! `lb-agent run`: load (or adopt) the dataplane, attach it, and keep the
//! maps equal to what the source says until told to stop.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::Ebpf;
use lb_common::Config;
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::{
    attach,
    loader::{self, Capacities},
    maps::Maps,
    model::{Desired, HealthCheck, Model, NodeInfo, desired_state},
    reconciler::{self, NodeSettings, Reconciler},
    sources::{kubernetes::KubeSource, manifests},
    telemetry::{HealthCheckServers, Telemetry},
};

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum SourceKind {
    Manifests(PathBuf),
    /// The API server: in-cluster config, `$KUBECONFIG` or this kubeconfig.
    Kubernetes {
        kubeconfig: Option<PathBuf>,
    },
}

enum Source {
    Manifests(manifests::Folder),
    Kubernetes(KubeSource),
}

#[derive(Clone, Debug)]
pub struct Options {
    pub source: SourceKind,
    pub node_name: String,
    pub zone: Option<String>,
    pub external_interfaces: Vec<String>,
    pub pod_interfaces: Vec<glob::Pattern>,
    /// Explicit node addresses; else those of the external interfaces.
    pub node_addresses: Vec<Ipv4Addr>,
    pub pin_dir: PathBuf,
    pub nat_ports: (u16, u16),
    pub capacities: Capacities,
    /// Where the host's /proc is (a container mounts it elsewhere).
    pub procfs: PathBuf,
    pub metrics_address: std::net::SocketAddr,
    pub health_address: std::net::SocketAddr,
}

/// IPv4 addresses of `interfaces`.
pub fn interface_addresses(interfaces: &[String]) -> Result<Vec<Ipv4Addr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().context("listing addresses")? {
        if !interfaces.contains(&ifa.interface_name) {
            continue;
        }
        if let Some(sin) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            out.push(sin.ip());
        }
    }
    Ok(out)
}

/// The live agent: its programs, maps and what it has programmed.
struct Agent {
    opts: Options,
    source: Source,
    telemetry: std::sync::Arc<Telemetry>,
    ebpf: Ebpf,
    maps: Maps,
    reconciler: Reconciler,
    model: Model,
    node: NodeInfo,
    settings: NodeSettings,
    pods: BTreeSet<String>,
    reported: Vec<String>,
}

pub async fn run(opts: Options) -> Result<()> {
    let attached = opts
        .external_interfaces
        .iter()
        .map(|i| attach::link_pin(&opts.pin_dir, loader::XDP_PROGRAM, i))
        .collect();
    let caps = &opts.capacities;
    let capacities = [
        ("lb_services", caps.services),
        ("lb_backends", caps.backends),
        ("lb_slots", caps.slots),
        ("lb_conntrack", caps.conntrack),
        ("lb_affinity", caps.affinity),
    ]
    .into();
    let telemetry = Telemetry::new(opts.pin_dir.clone(), attached, capacities);
    crate::telemetry::serve(telemetry.clone(), opts.metrics_address, opts.health_address).await?;
    // `changed`: the source has something new to read. `settling`: a
    // manifest is being written; it is read once closed or renamed into
    // place (`changed`), or after SETTLE for writers that keep it open.
    let (changed_tx, mut changed_rx) = mpsc::channel::<()>(1);
    let (settling_tx, mut settling_rx) = mpsc::channel::<()>(1);
    let mut _watcher = None;
    let source = match &opts.source {
        SourceKind::Manifests(path) => {
            _watcher = Some(watch_path(path, changed_tx, settling_tx)?);
            Source::Manifests(manifests::Folder::new(path))
        }
        SourceKind::Kubernetes { kubeconfig } => {
            let client = kube_client(kubeconfig.as_deref()).await?;
            let source = KubeSource::start(client, &opts.node_name, changed_tx);
            info!("waiting for the first full list of Services, EndpointSlices and this Node");
            source.ready().await.context("first sync from the API server")?;
            Source::Kubernetes(source)
        }
    };
    let mut agent = Agent::start(opts, source, telemetry)?;
    let mut health_checks = HealthCheckServers::default();
    // The programs' aya-log messages, into this process's log. The logger
    // owns the log map: it lives as long as the loop below.
    let mut ebpf_log = match aya_log::EbpfLogger::init(&mut agent.ebpf) {
        // SAFETY: the logger owns its ring buffer fd and keeps it open while
        // the AsyncFd holds it.
        Ok(logger) => Some(unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)?
        }),
        Err(e) => {
            warn!(error = %e, "eBPF log messages unavailable");
            None
        }
    };
    let (links_tx, mut links_rx) = mpsc::channel::<()>(1);
    if !agent.opts.pod_interfaces.is_empty() {
        std::thread::spawn(move || {
            if let Err(e) = attach::watch_links(|| links_tx.try_send(()).is_ok() || !links_tx.is_closed()) {
                error!(error = %e, "watching interfaces failed; new pod interfaces will not be served");
            }
        });
    }
    agent.attach_pods();
    // The first full sync: stale entries of an earlier run are pruned only now.
    if let Some(checks) = agent.sync() {
        health_checks.update(&checks).await;
    }

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            Some(()) = changed_rx.recv() => {
                while settling_rx.try_recv().is_ok() {}
                if let Some(checks) = agent.sync() {
                    health_checks.update(&checks).await;
                }
            }
            Some(()) = settling_rx.recv() => {
                tokio::select! {
                    Some(()) = changed_rx.recv() => {}
                    _ = tokio::time::sleep(SETTLE) => {}
                }
                while changed_rx.try_recv().is_ok() || settling_rx.try_recv().is_ok() {}
                if let Some(checks) = agent.sync() {
                    health_checks.update(&checks).await;
                }
            }
            Some(()) = links_rx.recv() => agent.attach_pods(),
            Ok(mut ready) = async { ebpf_log.as_mut().expect("guarded").readable_mut().await }, if ebpf_log.is_some() => {
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    info!("stopping; programs stay attached and maps pinned (use `lb-agent reset` to remove them)");
    Ok(())
}

impl Agent {
    fn start(opts: Options, source: Source, telemetry: std::sync::Arc<Telemetry>) -> Result<Self> {
        let mut ebpf = loader::load(&opts.pin_dir, &opts.capacities)?;
        attach::load_programs(&mut ebpf)?;
        for iface in &opts.external_interfaces {
            attach::attach_xdp(&mut ebpf, &opts.pin_dir, &opts.procfs, iface)?;
        }
        let maps = Maps::from_ebpf(&mut ebpf)?;
        let reconciler = Reconciler::adopt(&maps).context("adopting the pinned maps")?;
        let adopted = reconciler.summary();
        if adopted.frontends > 0 {
            info!(
                frontends = adopted.frontends,
                backends = adopted.backends,
                "adopted the maps of an earlier run"
            );
        }
        let facts = match &source {
            Source::Kubernetes(k) => k.node(),
            Source::Manifests(_) => Default::default(),
        };
        let addresses = if !opts.node_addresses.is_empty() {
            opts.node_addresses.clone()
        } else if !facts.addresses.is_empty() {
            facts.addresses.clone()
        } else {
            interface_addresses(&opts.external_interfaces)?
        };
        let Some(snat) = addresses.first() else {
            bail!("no node address: give --node-address or an --external-interface with an IPv4 address");
        };
        let settings = NodeSettings {
            addresses: addresses.iter().map(|a| a.octets()).collect(),
            config: Config {
                snat_addr: snat.octets(),
                nat_port_min: opts.nat_ports.0,
                nat_port_max: opts.nat_ports.1,
            },
        };
        let zone = opts.zone.clone().or(facts.zone);
        let node = NodeInfo { name: opts.node_name.clone(), zone, addresses };
        info!(node = %node.name, addresses = ?node.addresses, pin_dir = %opts.pin_dir.display(), "agent started");
        Ok(Self {
            opts,
            source,
            telemetry,
            ebpf,
            maps,
            reconciler,
            model: Model::default(),
            node,
            settings,
            pods: BTreeSet::new(),
            reported: Vec::new(),
        })
    }

    /// Reads the source and brings the maps in line with it; the health
    /// check ports to serve when that worked.
    fn sync(&mut self) -> Option<BTreeMap<u16, HealthCheck>> {
        let started = Instant::now();
        let (desired, errors) = match &mut self.source {
            Source::Manifests(folder) => {
                let (state, errors) = folder.refresh();
                (self.model.desired(state, &self.node), errors)
            }
            Source::Kubernetes(k) => (self.model.desired(&k.snapshot(), &self.node), Vec::new()),
        };
        report(&mut self.reported, &errors, desired);
        let applied = self.reconciler.plan(desired, &self.settings).and_then(|ops| {
            for op in &ops {
                debug!(?op, "map change");
            }
            reconciler::apply(&mut self.maps, &ops)
        });
        if let Err(e) = applied {
            self.telemetry.sync_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            error!(
                error = format!("{e:#}"),
                "sync failed; re-reading the maps and retrying at the next change"
            );
            match Reconciler::adopt(&self.maps) {
                Ok(r) => self.reconciler = r,
                Err(e) => error!(error = format!("{e:#}"), "re-reading the maps failed"),
            }
            return None;
        }
        let s = self.reconciler.summary();
        self.telemetry.synced(desired, started.elapsed(), s.frontends, s.backends);
        info!(
            frontends = s.frontends,
            backends = s.backends,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "synced"
        );
        Some(desired.health_checks.clone())
    }

    /// Attaches TC to pod interfaces not yet served.
    fn attach_pods(&mut self) {
        if self.opts.pod_interfaces.is_empty() {
            return;
        }
        let all = match attach::interfaces() {
            Ok(all) => all,
            Err(e) => return error!(error = %e, "listing interfaces"),
        };
        let pods = attach::matching(&all, &self.opts.pod_interfaces);
        for ifname in pods.difference(&self.pods.clone()) {
            match attach::attach_tc(&mut self.ebpf, &self.opts.pin_dir, &self.opts.procfs, ifname) {
                Ok(()) => {
                    self.pods.insert(ifname.clone());
                }
                Err(e) => {
                    warn!(interface = %ifname, error = format!("{e:#}"), "cannot attach to pod interface")
                }
            }
        }
        self.pods.retain(|p| pods.contains(p));
        attach::forget_gone(&self.opts.pin_dir, &all);
    }
}

async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await.context("no in-cluster config and no kubeconfig")?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// Logs manifest errors and semantic notes when they differ from `reported`.
fn report(reported: &mut Vec<String>, errors: &[manifests::ManifestError], desired: &Desired) {
    let mut lines: Vec<String> = errors.iter().map(|e| format!("manifest error: {e}")).collect();
    lines.extend(desired.notes.iter().map(|n| format!("{}: {}", n.object, n.message)));
    if lines != *reported {
        for l in &lines {
            warn!("{l}");
        }
        *reported = lines;
    }
}

/// How long a manifest being written may stay open before it is read anyway.
const SETTLE: Duration = Duration::from_millis(50);

/// Watches the manifests at `path`: sends on `changed` when a manifest was
/// closed after writing, renamed or removed, on `settling` when one is
/// being created or written.
fn watch_path(
    path: &Path,
    changed: mpsc::Sender<()>,
    settling: mpsc::Sender<()>,
) -> Result<notify::RecommendedWatcher> {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    let single = path.is_file().then(|| path.to_path_buf());
    let watched = path.to_path_buf();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        // Editors' swap files and writers' temporary files do not count;
        // the folder itself (removed, renamed) does.
        let ours = |p: &std::path::PathBuf| {
            *p == watched
                || match &single {
                    Some(file) => p == file,
                    None => manifests::is_manifest(p),
                }
        };
        if !event.paths.iter().any(ours) {
            return;
        }
        let _ = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Remove(_) => changed.try_send(()),
            EventKind::Access(_) => return,
            _ => settling.try_send(()),
        };
    })?;
    // Editors replace files by renaming: watch the folder, not the file.
    let dir = if path.is_dir() { path } else { path.parent().unwrap_or(Path::new(".")) };
    watcher.watch(dir, RecursiveMode::NonRecursive).with_context(|| format!("watching {}", dir.display()))?;
    Ok(watcher)
}

/// `--dry-run`: the desired state for the manifests, without touching the kernel.
pub fn dry_run(path: &Path, node: &NodeInfo) -> String {
    let loaded = manifests::load(path);
    let mut out = desired_state(&loaded.state, node).dump();
    for e in &loaded.errors {
        out.push_str(&format!("error: {e}\n"));
    }
    out
}
