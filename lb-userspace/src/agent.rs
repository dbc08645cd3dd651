//! `lb-agent run`: load (or adopt) the dataplane, attach it, and keep the
//! maps equal to what the source says until told to stop.
//!
//! The loop waits for a change (the source's, or an interface's), then
//! syncs: the node's facts and the source's state are read afresh, and the
//! `Dataplane` writes the difference. A failed sync is retried with backoff
//! while the maps keep their last good state. Syncs run on a worker thread
//! of their own, so metrics, health and the watchers never wait for one.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::Ebpf;
use lb_common::SockKey;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    attach,
    dataplane::Dataplane,
    loader::{self, Capacities},
    maps::Maps,
    model::{NodeInfo, desired_state, printable},
    reconciler::NodeSettings,
    socket_lb,
    sources::{NodeFacts, Snapshot, Source, kubernetes::KubeSource, manifests},
    telemetry::{HealthCheckServers, Telemetry},
};

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum SourceKind {
    Manifests(PathBuf),
    /// The API server: in-cluster config, `$KUBECONFIG` or this kubeconfig.
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        /// The API server's own address, replacing the configuration's
        /// (in-cluster config names the `kubernetes` Service's ClusterIP,
        /// which nothing translates before this agent has synced).
        api_server: Option<http::Uri>,
    },
}

#[derive(Clone, Debug)]
pub struct Options {
    pub source: SourceKind,
    pub node_name: String,
    pub zone: Option<String>,
    pub external_interfaces: Vec<String>,
    pub pod_interfaces: Vec<glob::Pattern>,
    /// Explicit node addresses; else the Node object's, else those of the
    /// external interfaces.
    pub node_addresses: Vec<IpAddr>,
    pub pin_dir: PathBuf,
    pub nat_ports: (u16, u16),
    pub capacities: Capacities,
    /// Where the host's /proc is (a container mounts it elsewhere).
    pub procfs: PathBuf,
    pub metrics_address: std::net::SocketAddr,
    pub health_address: std::net::SocketAddr,
    /// Which hook runs the north-south program on external interfaces.
    pub acceleration: attach::Acceleration,
    /// Hand translated packets to the host stack rather than redirect them.
    pub via_stack: bool,
    pub manifest_limits: manifests::Limits,
    /// The cluster's service-node-port-range.
    pub node_port_range: (u16, u16),
    /// externalIPs served (all when empty).
    pub external_ip_cidrs: Vec<ipnet::IpNet>,
    /// Whose sockets the cgroup socket hooks serve.
    pub socket_lb: socket_lb::Mode,
    /// The cgroup v2 directory they attach to (default: the host's root).
    pub cgroup_root: Option<PathBuf>,
    /// The cluster's service CIDRs, for the ClusterIP catch-all.
    pub service_cidrs: Vec<ipnet::Ipv4Net>,
}

/// IPv4 addresses of `interfaces`.
pub fn interface_addresses(interfaces: &[String]) -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().context("listing addresses")? {
        if !interfaces.contains(&ifa.interface_name) {
            continue;
        }
        if let Some(sin) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            out.push(sin.ip().into());
        }
    }
    Ok(out)
}

/// This node as the options, the source and the interfaces describe it now.
pub fn node_facts(opts: &Options, facts: &NodeFacts) -> Result<(NodeInfo, NodeSettings)> {
    let addresses = if !opts.node_addresses.is_empty() {
        opts.node_addresses.clone()
    } else if !facts.addresses.is_empty() {
        facts.addresses.clone()
    } else {
        interface_addresses(&opts.external_interfaces)?
    };
    let Some(snat) = addresses.first().copied() else {
        bail!("no node address: give --node-address or an --external-interface with an IPv4 address");
    };
    let settings = NodeSettings {
        addresses: addresses.iter().copied().collect(),
        snat_addr: snat,
        nat_ports: opts.nat_ports,
        via_stack: opts.via_stack,
        service_cidrs: service_cidrs(opts, facts)?,
    };
    let zone = opts.zone.clone().or_else(|| facts.zone.clone());
    let node = NodeInfo {
        name: opts.node_name.clone(),
        zone,
        addresses,
        node_port_range: opts.node_port_range,
        external_ip_cidrs: opts.external_ip_cidrs.clone(),
    };
    Ok((node, settings))
}

/// The catch-all's ranges: `--service-cidr`'s, else the cluster's
/// ServiceCIDRs. More than `lb_svc_cidrs` holds is an error for the flag;
/// from the cluster, the first ones are used and the rest only catch
/// less (a warning says so), rather than fail every sync.
fn service_cidrs(opts: &Options, facts: &NodeFacts) -> Result<Vec<ipnet::Ipv4Net>> {
    let room = lb_common::registry::SERVICE_CIDRS.capacity() as usize;
    if !opts.service_cidrs.is_empty() {
        if opts.service_cidrs.len() > room {
            bail!("{} --service-cidr ranges: the ClusterIP catch-all holds {room}", opts.service_cidrs.len());
        }
        return Ok(opts.service_cidrs.clone());
    }
    if facts.service_cidrs.len() > room {
        warn!(
            ranges = facts.service_cidrs.len(),
            room, "more ServiceCIDRs than the catch-all holds: the rest are left out"
        );
    }
    Ok(facts.service_cidrs.iter().take(room).copied().collect())
}

/// How soon a source that asked for it is read again.
const SOURCE_RETRY: Duration = Duration::from_millis(100);

/// Waits between retries of a failed sync: doubling from 100 ms to 10 s.
#[derive(Debug)]
struct Backoff(Option<Duration>);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    fn next(&mut self) -> Duration {
        let d = self.0.map_or(Self::FIRST, |d| (d * 2).min(Self::MAX));
        self.0 = Some(d);
        d
    }

    fn reset(&mut self) {
        self.0 = None;
    }
}

/// The live agent: its programs, maps and what it has programmed.
struct Agent {
    opts: Options,
    source: Source,
    telemetry: Arc<Telemetry>,
    ebpf: Ebpf,
    dataplane: Dataplane<Maps>,
    /// Pod interfaces served: name → ifindex.
    pods: BTreeMap<String, u32>,
    reported: Vec<String>,
}

pub async fn run(opts: Options) -> Result<()> {
    let telemetry = Telemetry::new(opts.pin_dir.clone());
    crate::telemetry::serve(telemetry.clone(), opts.metrics_address, opts.health_address).await?;
    // The source signals `changed` when it has something new to read.
    let (changed_tx, mut changed_rx) = mpsc::channel::<()>(1);
    let mut _watch = None;
    let source = match &opts.source {
        SourceKind::Manifests(path) => {
            let watch = manifests::Watch::start(path, changed_tx)?;
            let settled_only = watch.settled_only.clone();
            _watch = Some(watch);
            Source::Manifests {
                folder: manifests::Folder::with_limits(path, opts.manifest_limits),
                settled_only,
            }
        }
        SourceKind::Kubernetes { kubeconfig, api_server } => {
            let (client, url) = kube_client(kubeconfig.as_deref(), api_server.clone()).await?;
            let source = KubeSource::start(client, &opts.node_name, changed_tx);
            info!(api_server = %url, "waiting for the first full list of Services, EndpointSlices and this Node");
            let hint = api_server_hint(
                &url,
                std::env::var("KUBERNETES_SERVICE_HOST").ok().as_deref(),
                api_server.is_some(),
            );
            {
                let ready = source.ready();
                tokio::pin!(ready);
                loop {
                    tokio::select! {
                        done = &mut ready => break done.context("first sync from the API server")?,
                        _ = tokio::time::sleep(Duration::from_secs(10)) => {
                            warn!(api_server = %url, "no full list from the API server yet{}", hint.as_deref().unwrap_or(""));
                        }
                    }
                }
            }
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
    // Interfaces and addresses that come and go: pods to attach to, and
    // node addresses to follow.
    let (links_tx, mut links_rx) = mpsc::channel::<()>(1);
    std::thread::spawn(move || {
        if let Err(e) = attach::watch_links(|| links_tx.try_send(()).is_ok() || !links_tx.is_closed()) {
            error!(error = %e, "watching interfaces failed; new pod interfaces and addresses will not be followed");
        }
    });
    agent.attach_pods();

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut backoff = Backoff(None);
    // The first full sync runs at once: stale entries of an earlier run are
    // pruned only then.
    let mut retry_at = Some(tokio::time::Instant::now());
    loop {
        tokio::select! {
            Some(()) = changed_rx.recv() => retry_at = Some(tokio::time::Instant::now()),
            Some(()) = links_rx.recv() => {
                agent.attach_pods();
                retry_at = Some(tokio::time::Instant::now());
            }
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                retry_at = None;
                match tokio::task::block_in_place(|| agent.sync()) {
                    Ok(again) => {
                        backoff.reset();
                        health_checks.update(&agent.dataplane.desired().health_checks).await;
                        if again {
                            retry_at = Some(tokio::time::Instant::now() + SOURCE_RETRY);
                        }
                    }
                    Err(e) => {
                        agent.telemetry.sync_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let wait = backoff.next();
                        error!(error = format!("{e:#}"), retry_in_ms = wait.as_millis() as u64, "sync failed; the maps keep their last good state");
                        retry_at = Some(tokio::time::Instant::now() + wait);
                    }
                }
            }
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
    fn start(opts: Options, mut source: Source, telemetry: Arc<Telemetry>) -> Result<Self> {
        // Fail before touching the kernel if this node cannot be described.
        let (node, _) = node_facts(&opts, &source.snapshot().node)?;
        let sockets = match opts.socket_lb {
            socket_lb::Mode::Off => loader::SocketHooks::default(),
            mode => loader::SocketHooks {
                host_netns_cookie: socket_lb::netns_cookie()?,
                pods: mode == socket_lb::Mode::All,
            },
        };
        let mut ebpf = loader::load(&opts.pin_dir, &opts.capacities, sockets)?;
        attach::load_programs(&mut ebpf)?;
        // The maps are adopted (and completed where an older version's pins
        // lack something) before these programs replace the running ones.
        let dataplane = Dataplane::adopt(Maps::from_ebpf(&mut ebpf)?)?;
        let mut externals = Vec::new();
        for iface in &opts.external_interfaces {
            let ext =
                attach::attach_external(&mut ebpf, &opts.pin_dir, &opts.procfs, iface, opts.acceleration)?;
            info!(interface = %ext.interface, hook = %ext.hook.name(), reason = %ext.reason, "north-south hook");
            externals.push(ext);
        }
        telemetry.attached(&opts.pin_dir, externals);
        if opts.socket_lb == socket_lb::Mode::Off {
            attach::detach_sockets(&opts.pin_dir, None)?;
        } else {
            let cgroup = socket_lb::cgroup_root(opts.cgroup_root.as_deref(), &opts.procfs)?;
            attach::attach_sockets(&mut ebpf, &opts.pin_dir, &cgroup)?;
            info!(cgroup = %cgroup.display(), mode = ?opts.socket_lb, "socket hooks attached");
        }
        let adopted = dataplane.summary();
        if adopted.frontends > 0 {
            info!(
                frontends = adopted.frontends,
                backends = adopted.backends,
                "adopted the maps of an earlier run"
            );
        }
        info!(node = %node.name, addresses = ?node.addresses, pin_dir = %opts.pin_dir.display(), "agent started");
        Ok(Self { opts, source, telemetry, ebpf, dataplane, pods: BTreeMap::new(), reported: Vec::new() })
    }

    /// Reads the node and the source afresh and brings the maps in line;
    /// whether the source asks to be read again soon.
    fn sync(&mut self) -> Result<bool> {
        let started = Instant::now();
        let Snapshot { state, errors, node, retry } = self.source.snapshot();
        let (node, settings) = node_facts(&self.opts, &node)?;
        let synced = self.dataplane.sync(&state, &node, &settings);
        let mut lines: Vec<String> = errors.iter().map(|e| format!("manifest error: {e}")).collect();
        let desired = self.dataplane.desired();
        lines.extend(desired.notes.iter().map(|n| format!("{}: {}", n.object, n.message)));
        for (frontend, full) in self.dataplane.overflow() {
            let service = desired.frontends.get(frontend).map_or("?", |f| f.service.as_str());
            lines.push(format!("{service}: {frontend} not programmed: {full}"));
        }
        let refused = errors.len() + desired.notes.len();
        let unprogrammed = self.dataplane.overflow().len();
        self.telemetry.refused.store(refused as u64, std::sync::atomic::Ordering::Relaxed);
        self.telemetry.unprogrammed.store(unprogrammed as u64, std::sync::atomic::Ordering::Relaxed);
        report(&mut self.reported, lines);
        let ops = synced?;
        if ops > 0 && self.opts.socket_lb != socket_lb::Mode::Off {
            self.terminate_stale_sockets();
        }
        let s = self.dataplane.summary();
        self.telemetry.synced(started.elapsed(), s.frontends, s.backends);
        info!(
            frontends = s.frontends,
            backends = s.backends,
            writes = ops,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "synced"
        );
        Ok(retry)
    }

    /// Destroys connected UDP sockets whose backend (given by the socket
    /// hooks) is no longer one of its frontend's: the node's, and with
    /// `--socket-lb all` the pods'.
    fn terminate_stale_sockets(&mut self) {
        let dataplane = &self.dataplane;
        // Built at the first socket the hooks connected, if there is one:
        // most syncs find none and skip the walk over every frontend.
        let mut live = None;
        let mut stale = |cookie: u64, addr: [u8; 4], port: u16| {
            let key = SockKey { cookie, addr, port, _pad: 0 };
            dataplane.store.sock_rev.get(&key, 0).is_ok_and(|svc| {
                let live = live.get_or_insert_with(|| dataplane.live_backends());
                live.get(&svc.frontend_id).is_none_or(|backends| !backends.contains(&(addr, port)))
            })
        };
        let mut here = || socket_lb::terminate_stale(&socket_lb::SockDiag::open()?, &mut stale);
        let mut n = match here() {
            Ok(n) => n,
            Err(e) => {
                warn!(error = format!("{e:#}"), "cannot search UDP sockets for gone backends");
                0
            }
        };
        if self.opts.socket_lb == socket_lb::Mode::All {
            match socket_lb::in_other_namespaces(&self.opts.procfs, here) {
                Ok(more) => n += more,
                Err(e) => {
                    warn!(error = format!("{e:#}"), "cannot search pods' UDP sockets for gone backends")
                }
            }
        }
        if n > 0 {
            info!(sockets = n, "terminated UDP sockets connected to gone backends");
            self.telemetry.sockets_terminated.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Attaches TC to pod interfaces not yet served, and tells the
    /// programs which interfaces lead into pods.
    fn attach_pods(&mut self) {
        if self.opts.pod_interfaces.is_empty() {
            return;
        }
        let all = match attach::interfaces() {
            Ok(all) => all,
            Err(e) => return error!(error = %e, "listing interfaces"),
        };
        let pods = attach::matching(&all, &self.opts.pod_interfaces);
        for (ifname, ifindex) in &pods {
            match self.pods.get(ifname) {
                Some(known) if known == ifindex => continue,
                // The same name on a new interface: the old link went with the old one.
                Some(_) => attach::forget_pod(&self.opts.pin_dir, ifname),
                None => {}
            }
            match attach::attach_pod(&mut self.ebpf, &self.opts.pin_dir, &self.opts.procfs, ifname) {
                Ok(()) => {
                    self.pods.insert(ifname.clone(), *ifindex);
                }
                Err(e) => {
                    warn!(interface = %ifname, error = format!("{e:#}"), "cannot attach to pod interface")
                }
            }
        }
        self.pods.retain(|name, index| pods.get(name) == Some(index));
        attach::forget_gone(&self.opts.pin_dir, &all);
        let served: BTreeSet<u32> = self.pods.values().copied().collect();
        if let Err(e) = self.dataplane.store.set_pod_ifs(&served) {
            error!(error = format!("{e:#}"), "updating lb_pod_ifs; packets for pods take the stack");
        }
    }
}

/// A client for the API server, and the address it dials: `api_server`
/// when given, else the kubeconfig's or the in-cluster config's.
async fn kube_client(
    kubeconfig: Option<&Path>,
    api_server: Option<http::Uri>,
) -> Result<(kube::Client, http::Uri)> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await.context("no in-cluster config and no kubeconfig")?,
    };
    if let Some(url) = api_server {
        config.cluster_url = url;
    }
    let url = config.cluster_url.clone();
    Ok((kube::Client::try_from(config)?, url))
}

/// What to tell an operator whose agent cannot reach the API server, when
/// the address is the in-cluster one: the `kubernetes` Service's ClusterIP
/// (`KUBERNETES_SERVICE_HOST`), which with kube-proxy gone nothing
/// translates before this agent has synced.
pub fn api_server_hint(url: &http::Uri, service_host: Option<&str>, overridden: bool) -> Option<String> {
    let host = url.host()?.trim_start_matches('[').trim_end_matches(']');
    (!overridden && service_host.is_some_and(|h| h == host)).then(|| {
        format!(
            ": {host} is the `kubernetes` Service's ClusterIP (KUBERNETES_SERVICE_HOST), which nothing translates \
             until this agent has synced; set LB_API_SERVER (deploy/configmap.yaml) to the API server's own \
             address, e.g. https://<control-plane address>:6443"
        )
    })
}

/// Logs manifest errors, semantic notes and frontends left out when they
/// differ from what was `reported` last.
fn report(reported: &mut Vec<String>, lines: Vec<String>) {
    if lines != *reported {
        for l in &lines {
            warn!("{}", printable(l));
        }
        *reported = lines;
    }
}

/// `--dry-run`: the desired state for the manifests, without touching the
/// kernel; an error if the manifests cannot be read at all.
pub fn dry_run(path: &Path, node: &NodeInfo) -> Result<String> {
    let loaded = manifests::load(path)?;
    let mut out = desired_state(&loaded.state, node).dump();
    for e in &loaded.errors {
        out.push_str(&format!("error: {}\n", printable(&e.to_string())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_in_cluster_api_server_gets_a_hint() {
        let url: http::Uri = "https://10.96.0.1:443".parse().unwrap();
        let hint = api_server_hint(&url, Some("10.96.0.1"), false).expect("a hint");
        assert!(hint.contains("LB_API_SERVER"), "{hint}");
        assert_eq!(api_server_hint(&url, Some("10.96.0.1"), true), None, "the operator already set it");
        assert_eq!(api_server_hint(&url, None, false), None, "not the in-cluster address");
        let other: http::Uri = "https://192.0.2.10:6443".parse().unwrap();
        assert_eq!(api_server_hint(&other, Some("10.96.0.1"), false), None);
    }

    #[test]
    fn retries_back_off_up_to_a_ceiling_and_start_over_after_success() {
        let mut b = Backoff(None);
        let waits: Vec<u128> = (0..10).map(|_| b.next().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]);
        b.reset();
        assert_eq!(b.next(), Backoff::FIRST);
    }
}
