//! `lb-agent`: the node agent of the eBPF service load balancer.

use std::{net::IpAddr, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::{Arg, ArgMatches, Args, FromArgMatches, Parser, Subcommand, ValueEnum, value_parser};
use lb_userspace::{
    agent, attach, inspect,
    loader::{self, Capacities},
    maps::Maps,
    model::NodeInfo,
    socket_lb,
};

#[derive(Parser)]
#[command(name = "lb-agent", version, about = "eBPF/XDP service load balancer: the node agent")]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or tracing directives).
    #[arg(long, global = true, env = "LB_LOG", default_value = "info")]
    log_level: String,

    /// Log format: text, or json (one object per line, for log collectors).
    #[arg(long, global = true, env = "LB_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,

    /// bpffs directory holding the pinned maps and program links.
    #[arg(long, global = true, env = "LB_PIN_DIR", default_value = loader::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Program this node from Kubernetes manifests (or the API server) and keep it in sync.
    ///
    /// Loads the XDP and TC programs (or adopts those pinned by an earlier
    /// run), attaches XDP to the external interfaces and TC to pod
    /// interfaces (also those that appear later), then applies every change
    /// of the manifests within a moment. Stopping leaves traffic flowing.
    Run(Box<RunArgs>),
    /// Show the live dataplane from the pinned maps.
    Inspect {
        #[arg(value_enum)]
        what: What,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        /// At most this many conntrack entries.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Detach the programs and remove every pin (maps and links).
    Reset,
    /// Make sure the pin directory is on a bpffs, mounting one on
    /// /sys/fs/bpf if nothing is (a DaemonSet's privileged init container
    /// runs this, so the mount reaches the host).
    MountBpffs,
    /// Print the version.
    Version,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Folder (or file) of Service, EndpointSlice and Endpoints manifests.
    #[arg(long, env = "LB_MANIFESTS", required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    manifests: Option<PathBuf>,
    /// Watch the Kubernetes API server instead (in-cluster config or $KUBECONFIG).
    #[arg(long)]
    kubernetes: bool,
    /// Kubeconfig file for --kubernetes [default: in-cluster config, then $KUBECONFIG].
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// The API server's own address (URL), replacing the configuration's.
    /// Needed without kube-proxy: in-cluster config names the `kubernetes`
    /// Service's ClusterIP, which nothing translates before this agent has
    /// synced. Empty: unset.
    #[arg(long, env = "LB_API_SERVER", value_parser = parse_api_server)]
    api_server: Option<ApiServer>,
    /// This node's name (matched against endpoints' nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// This node's topology zone.
    #[arg(long, env = "LB_ZONE")]
    zone: Option<String>,
    /// Interface(s) facing clients outside the cluster: XDP attaches here.
    #[arg(
        long = "external-interface",
        env = "LB_EXTERNAL_INTERFACES",
        value_delimiter = ',',
        required_unless_present = "dry_run"
    )]
    external_interfaces: Vec<String>,
    /// Glob(s) naming the host side of pod interfaces: TC attaches here.
    #[arg(long = "pod-interfaces", env = "LB_POD_INTERFACES", value_delimiter = ',')]
    pod_interfaces: Vec<String>,
    /// Node address(es) for NodePort and SNAT [default: the Node object's
    /// InternalIP/ExternalIP, else the external interfaces' IPv4 addresses].
    #[arg(long = "node-address")]
    node_addresses: Vec<IpAddr>,
    /// SNAT source port range, MIN-MAX.
    #[arg(long, default_value = "61000-65535", value_parser = parse_range)]
    nat_ports: (u16, u16),
    /// The cluster's NodePort range (the API server's
    /// --service-node-port-range): nodePorts outside it are refused.
    #[arg(long, env = "LB_NODE_PORT_RANGE", default_value = "30000-32767", value_parser = parse_range)]
    node_port_range: (u16, u16),
    /// CIDRs externalIPs must fall in (all are served when unset). Anyone
    /// who may create Services can otherwise claim any address for them,
    /// a node's included (CVE-2020-8554).
    #[arg(long, env = "LB_EXTERNAL_IP_CIDRS", value_delimiter = ',')]
    external_ip_cidrs: Vec<ipnet::IpNet>,
    #[command(flatten)]
    map_sizes: MapSizes,
    /// Prometheus metrics (and health) on this address.
    #[arg(long, env = "LB_METRICS_ADDRESS", default_value = "127.0.0.1:9960")]
    metrics_address: std::net::SocketAddr,
    /// /healthz and /readyz on this address (kubelet probes it).
    #[arg(long, env = "LB_HEALTH_ADDRESS", default_value = "0.0.0.0:9961")]
    health_address: std::net::SocketAddr,
    /// The host's /proc (a DaemonSet mounts it elsewhere; /proc/sys is read-only in containers).
    #[arg(long, env = "LB_PROCFS", default_value = "/proc")]
    procfs: PathBuf,
    /// Print the desired state for the manifests and exit, touching nothing.
    #[arg(long)]
    dry_run: bool,
    /// The hook for the north-south program on each external interface:
    /// `auto` takes XDP where the interface is a NIC whose driver runs it
    /// natively, else TC (always correct, and it forwards around the host
    /// stack); `xdp` or `tc` force one.
    #[arg(long, env = "LB_ACCELERATION", value_enum, default_value = "auto")]
    acceleration: AccelerationArg,
    /// Manifest files larger than this are reported and not read.
    #[arg(long, env = "LB_MAX_MANIFEST_BYTES", default_value_t = 16 << 20)]
    max_manifest_bytes: u64,
    /// How translated packets continue: `redirect` sends them on from TC
    /// around the host stack (faster; a netfilter firewall or NetworkPolicy
    /// in the host then sees neither direction of those flows); `stack`
    /// hands them to it.
    #[arg(long, env = "LB_FORWARDING", value_enum, default_value = "redirect")]
    forwarding: Forwarding,
    /// Socket-level load balancing (cgroup hooks at connect, sendmsg,
    /// recvmsg, getpeername): `host` serves the node's own clients (the
    /// kubelet, hostNetwork pods, this agent), which no packet hook sees;
    /// `all` serves pods too, translating their TCP and connected UDP once
    /// at connect() instead of per packet (programs in the pod that expect
    /// the original destination, such as mesh sidecars, then see the
    /// backend); `off` attaches nothing.
    #[arg(long, env = "LB_SOCKET_LB", value_enum, default_value = "host")]
    socket_lb: SocketLbArg,
    /// cgroup v2 directory the socket hooks attach to [default: the host's
    /// cgroup v2 mount, found in /proc/self/mountinfo]; on a hybrid host a
    /// directory whose `unified` child is cgroup v2 also does.
    #[arg(long, env = "LB_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// The cluster's service CIDR(s) (the API server's
    /// --service-cluster-ip-range): as kube-proxy's nftables mode does, a
    /// packet to a ClusterIP on a port no Service uses is answered port
    /// unreachable, and one to an address of the range no Service has is
    /// dropped. Unset: the ServiceCIDR objects' ranges (Kubernetes 1.33+),
    /// else no catch-all.
    #[arg(long = "service-cidr", env = "LB_SERVICE_CIDRS", value_delimiter = ',')]
    service_cidrs: Vec<ipnet::IpNet>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SocketLbArg {
    Off,
    Host,
    All,
}

#[derive(Clone, Copy, ValueEnum)]
enum AccelerationArg {
    Auto,
    Xdp,
    Tc,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Forwarding {
    Redirect,
    Stack,
}

#[derive(Clone, Copy, ValueEnum)]
enum What {
    /// Frontends, the Service each serves, and their backends in slot order.
    Services,
    Backends,
    Conntrack,
    /// Per-frontend counters and drops by reason.
    Stats,
    /// Every map: type, entries, capacity.
    Maps,
    /// The interfaces and cgroups the programs are attached to, and with which hook.
    Interfaces,
}

/// The map capacities, one flag per size of the map registry
/// (`--max-frontends`, `--conntrack-size`...).
struct MapSizes(Capacities);

/// The node's online CPUs (not a container's CPU quota), for the
/// conntrack default.
fn cpus() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(n).unwrap_or(1).max(1)
}

impl FromArgMatches for MapSizes {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut caps = Capacities::for_node(cpus());
        for (flag, _, _) in Capacities::flags() {
            if let Some(n) = m.get_one::<u32>(flag) {
                caps.set(flag, *n);
            }
        }
        Ok(Self(caps))
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for MapSizes {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        Capacities::flags().fold(cmd, |cmd, (flag, default, maps)| {
            let default = if flag == "conntrack-size" {
                format!("2 × max(32768 × CPUs, 131072) = {}", loader::conntrack_entries(cpus()))
            } else {
                default.to_string()
            };
            cmd.arg(
                Arg::new(flag)
                    .long(flag)
                    .value_name("ENTRIES")
                    .value_parser(value_parser!(u32).range(1..))
                    .help(format!("Capacity of {} [default: {default}]", maps.join(" and "))),
            )
        })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or("expected MIN-MAX")?;
    let (a, b): (u16, u16) = (a.parse().map_err(|_| "bad MIN")?, b.parse().map_err(|_| "bad MAX")?);
    if a == 0 || a > b {
        return Err("MIN must be at least 1 and not above MAX".into());
    }
    Ok((a, b))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level).context("--log-level")?;
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => logs.json().init(),
    }
    // The programs' aya-log messages pass through the `log` facade, and the
    // loader sets their level from it: make it follow the tracing filter.
    use tracing::level_filters::LevelFilter as L;
    log::set_max_level(match L::current() {
        L::OFF => log::LevelFilter::Off,
        L::ERROR => log::LevelFilter::Error,
        L::WARN => log::LevelFilter::Warn,
        L::INFO => log::LevelFilter::Info,
        L::DEBUG => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    });
    match cli.command {
        Command::Run(args) => run(*args, cli.pin_dir),
        Command::Inspect { what, output, limit } => {
            let maps = Maps::open_pinned(&cli.pin_dir)?;
            print_inspect(&maps, &cli.pin_dir, what, output, limit)
        }
        Command::Reset => {
            for removed in attach::reset(&cli.pin_dir)? {
                println!("removed {removed}");
            }
            Ok(())
        }
        Command::MountBpffs => loader::ensure_bpffs(&cli.pin_dir),
        Command::Version => {
            println!("lb-agent {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}

/// `--api-server`: a URL, or nothing when empty (a ConfigMap's placeholder).
#[derive(Clone, Debug)]
struct ApiServer(Option<http::Uri>);

fn parse_api_server(s: &str) -> Result<ApiServer, String> {
    if s.trim().is_empty() {
        return Ok(ApiServer(None));
    }
    let url: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if url.scheme().is_none() || url.host().is_none() {
        return Err(format!("{s:?}: give scheme, host and port, e.g. https://192.0.2.10:6443"));
    }
    Ok(ApiServer(Some(url)))
}

fn run(args: RunArgs, pin_dir: PathBuf) -> Result<()> {
    if args.dry_run {
        if args.node_addresses.is_empty() && args.external_interfaces.is_empty() {
            anyhow::bail!("--dry-run needs the node's addresses: --node-address or --external-interface");
        }
        let addresses = if args.node_addresses.is_empty() {
            agent::interface_addresses(&args.external_interfaces)?
        } else {
            args.node_addresses.clone()
        };
        let node = NodeInfo {
            name: args.node_name,
            zone: args.zone,
            addresses,
            node_port_range: args.node_port_range,
            external_ip_cidrs: args.external_ip_cidrs,
        };
        let manifests = args.manifests.context("--dry-run reads --manifests")?;
        print!("{}", agent::dry_run(&manifests, &node)?);
        return Ok(());
    }
    let pod_interfaces = args
        .pod_interfaces
        .iter()
        .map(|p| glob::Pattern::new(p).with_context(|| format!("--pod-interfaces {p:?}")))
        .collect::<Result<_>>()?;
    let source = match args.manifests {
        Some(path) => agent::SourceKind::Manifests(path),
        None => agent::SourceKind::Kubernetes {
            kubeconfig: args.kubeconfig,
            api_server: args.api_server.and_then(|a| a.0),
        },
    };
    let opts = agent::Options {
        source,
        node_name: args.node_name,
        zone: args.zone,
        external_interfaces: args.external_interfaces,
        pod_interfaces,
        node_addresses: args.node_addresses,
        pin_dir,
        nat_ports: args.nat_ports,
        capacities: args.map_sizes.0,
        procfs: args.procfs,
        metrics_address: args.metrics_address,
        health_address: args.health_address,
        acceleration: match args.acceleration {
            AccelerationArg::Auto => attach::Acceleration::Auto,
            AccelerationArg::Xdp => attach::Acceleration::Xdp,
            AccelerationArg::Tc => attach::Acceleration::Tc,
        },
        via_stack: args.forwarding == Forwarding::Stack,
        manifest_limits: lb_userspace::sources::manifests::Limits { max_file_bytes: args.max_manifest_bytes },
        node_port_range: args.node_port_range,
        external_ip_cidrs: args.external_ip_cidrs,
        socket_lb: match args.socket_lb {
            SocketLbArg::Off => socket_lb::Mode::Off,
            SocketLbArg::Host => socket_lb::Mode::Host,
            SocketLbArg::All => socket_lb::Mode::All,
        },
        cgroup_root: args.cgroup_root,
        // IPv6 ranges wait for the IPv6 dataplane.
        service_cidrs: args
            .service_cidrs
            .iter()
            .filter_map(|n| match n {
                ipnet::IpNet::V4(v4) => Some(v4.trunc()),
                ipnet::IpNet::V6(_) => None,
            })
            .collect(),
    };
    // Two workers: a sync holds one (`block_in_place`), the HTTP servers and
    // the watchers keep the other.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(agent::run(opts))
}

fn print_inspect(
    maps: &Maps,
    pin_dir: &std::path::Path,
    what: What,
    output: Output,
    limit: usize,
) -> Result<()> {
    match what {
        What::Services => show(&inspect::services(maps)?, output, |r| inspect::services_table(r).to_string()),
        What::Backends => show(&inspect::backends(maps)?, output, |r| inspect::backends_table(r).to_string()),
        What::Conntrack => {
            show(&inspect::conntrack(maps, limit)?, output, |r| inspect::conntrack_table(r).to_string())
        }
        What::Stats => show(&inspect::stats(maps)?, output, |s| {
            let (services, drops) = inspect::stats_table(s);
            format!("{services}\n{drops}")
        }),
        What::Maps => show(&inspect::maps(maps), output, |r| inspect::maps_table(r).to_string()),
        What::Interfaces => {
            show(&inspect::interfaces(pin_dir)?, output, |r| inspect::interfaces_table(r).to_string())
        }
    }
}

/// Prints `rows` as JSON or as the table `table` renders.
fn show<T: serde::Serialize + ?Sized>(
    rows: &T,
    output: Output,
    table: impl FnOnce(&T) -> String,
) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(rows)?),
        Output::Table => println!("{}", table(rows)),
    }
    Ok(())
}
