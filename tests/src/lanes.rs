//! Forwarding benchmarks: three identical lanes, one per dataplane, so runs
//! can alternate between them.
//!
//! ```text
//!  client ns                 node ns                        pod ns
//!  eth0 192.0.2.100 ──veth── eth0 192.0.2.11   pod0 ──veth── eth0
//!  (generator, wrk)          dataplane under test           10.128.0.0/10 local
//! ```
//!
//! The node forwards the synthetic services (`bench::vip_of`, endpoints
//! `bench::endpoints_of`, all on this node) with one of: the real `lb-agent`
//! on its TC path or its XDP path (the north-south program at TC or XDP on
//! eth0, TC on pod0), kube-proxy's iptables rules, or its nftables rules
//! (`kube_proxy`). The links keep the kernel's offloads. The node's eth0
//! runs `floor_pass` except in the XDP lane (which has `lb_xdp` there): a
//! veth needs an XDP program on the receiving side to take the generator's
//! XDP_TX frames.
//!
//! Packets per second: `floor_gen` runs in live-frames mode on the client's
//! eth0 and sends UDP frames to the services, each written whole from a
//! template (the pages come back with whatever the node wrote); the pod
//! counts and drops them with `floor_drop`, in generic (skb) mode so that it
//! sees every way in: through the veth, or redirected into the pod.
//! Connections per second: `wrk` in the client against `lb-netcheck
//! http-close` in the pod; from the node itself, `wrk` in the node's
//! namespace (inside the agent's cgroup, where its socket hooks attach;
//! kube-proxy's rules serve it from their OUTPUT chains).

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{Array, PerCpuArray},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::floor::{GEN_PORT_BASE, GenConfig, Template};
use lb_userspace::loader::FLOOR_OBJECT;

use crate::{
    bench::{self, Proto, endpoints_of, vip_of, write_manifests},
    kube_proxy,
    netns::{Agent, Bpffs, Cgroup, HostProcess, Netns, Place, agent_binary, run, unique, veth, wait_for},
    packet::{CLIENT_MAC, NODE_MAC},
};

const POD_MAC: &str = "02:00:00:00:01:01";
const GATEWAY_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// Link-local next hop both ways between node and pod (Calico style).
const LINK_GW: &str = "169.254.1.1";
/// The node's default route points here; nobody answers.
const NOWHERE: &str = "192.0.2.254";
const ENDPOINTS_PER_SERVICE: u32 = 10;
/// Frames per generator test run; runs repeat until the time is up.
const GEN_BATCH: u32 = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataplane {
    /// `lb-agent --acceleration tc`: what a veth or a VM NIC gets.
    AgentTc,
    /// `lb-agent --acceleration xdp`.
    AgentXdp,
    Iptables,
    Nftables,
}

/// The number of dataplanes, lanes and columns.
pub const DATAPLANES: usize = 4;

impl Dataplane {
    pub const ALL: [Dataplane; DATAPLANES] =
        [Dataplane::AgentTc, Dataplane::AgentXdp, Dataplane::Iptables, Dataplane::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            Dataplane::AgentTc => "lb-agent (TC)",
            Dataplane::AgentXdp => "lb-agent (XDP)",
            Dataplane::Iptables => "kube-proxy iptables",
            Dataplane::Nftables => "kube-proxy nftables",
        }
    }

    /// A short column label.
    pub fn short(self) -> &'static str {
        match self {
            Dataplane::AgentTc => "tc",
            Dataplane::AgentXdp => "xdp",
            Dataplane::Iptables => "ipt",
            Dataplane::Nftables => "nft",
        }
    }
}

pub struct Lane {
    pub dataplane: Dataplane,
    /// Time to load the dataplane's state for all services.
    pub load: Duration,
    // Drop order: processes before their namespaces, the bpffs last.
    agent: Option<Agent>,
    server: Option<Child>,
    /// The agent lanes' cgroup: the agent and the node's own clients.
    cgroup: Option<Cgroup>,
    pub client: Netns,
    pub node: Netns,
    pub pod: Netns,
    /// The TC lane's two client pods: one per pod path (see `pod_cps`).
    pub client_pods: Vec<Netns>,
    client_ifindex: u32,
    _bpffs: Option<Bpffs>,
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

/// The three lanes for `services` services of one protocol.
pub struct Lanes {
    pub services: u32,
    pub proto: Proto,
    pub lanes: Vec<Lane>,
    floor: Ebpf,
    manifests: PathBuf,
}

impl Drop for Lanes {
    fn drop(&mut self) {
        self.lanes.clear();
        let _ = std::fs::remove_dir_all(&self.manifests);
    }
}

/// One generator run through a lane.
#[derive(Clone, Copy, Debug)]
pub struct PpsRun {
    pub sent: u64,
    pub delivered: u64,
    pub secs: f64,
}

impl PpsRun {
    pub fn pps(&self) -> f64 {
        self.delivered as f64 / self.secs
    }

    /// What the generator offered, per second.
    pub fn offered(&self) -> f64 {
        self.sent as f64 / self.secs
    }
}

/// One `wrk` run through a lane.
#[derive(Clone, Copy, Debug)]
pub struct CpsRun {
    pub cps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    pub softirq_secs: f64,
    pub connections: u64,
}

impl Lanes {
    pub fn new(services: u32, proto: Proto) -> Result<Self> {
        let mut floor = Ebpf::load(FLOOR_OBJECT)?;
        for p in ["floor_pass", "floor_drop", "floor_gen"] {
            let x: &mut Xdp = floor.program_mut(p).context(p)?.try_into()?;
            x.load()?;
        }
        let manifests = std::env::temp_dir().join(unique("lanes"));
        write_manifests(&manifests, services, ENDPOINTS_PER_SERVICE, proto, Some("bench"))?;
        let mut lanes = Self { services, proto, lanes: Vec::new(), floor, manifests };
        for dataplane in Dataplane::ALL {
            let lane = lanes.build(dataplane)?;
            lanes.lanes.push(lane);
        }
        Ok(lanes)
    }

    fn build(&mut self, dataplane: Dataplane) -> Result<Lane> {
        let (client, node, pod) = (Netns::new("c")?, Netns::new("n")?, Netns::new("p")?);
        veth(&client, "eth0", &node, "eth0")?;
        veth(&node, "pod0", &pod, "eth0")?;
        let mac = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
        client.ip(&["link", "set", "eth0", "address", &mac(CLIENT_MAC)])?;
        let (client_addr, node_addr) =
            (Ipv4Addr::from(bench::CLIENT), Ipv4Addr::from(bench::NODE).to_string());
        client.ip(&["addr", "add", &format!("{client_addr}/24"), "dev", "eth0"])?;
        client.ip(&["route", "add", "10.96.0.0/12", "via", &node_addr])?;
        client.ip(&["route", "add", kube_proxy::CLUSTER_CIDR, "via", &node_addr])?;
        node.ip(&["link", "set", "eth0", "address", &mac(NODE_MAC)])?;
        node.ip(&["addr", "add", &format!("{node_addr}/24"), "dev", "eth0"])?;
        node.ip(&["link", "set", "pod0", "address", GATEWAY_MAC])?;
        for key in
            ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
        {
            run(node.cmd("sysctl").args(["-qw", key]))?;
        }
        // The pod owns the whole endpoint range; both sides of its link
        // reach each other through a fixed neighbour, without ARP.
        node.ip(&["neigh", "add", LINK_GW, "lladdr", POD_MAC, "dev", "pod0", "nud", "permanent"])?;
        node.ip(&["route", "add", kube_proxy::CLUSTER_CIDR, "via", LINK_GW, "dev", "pod0", "onlink"])?;
        // As on any node, a default route (toward an address nobody has):
        // the node's own connections to service addresses need one before
        // kube-proxy's OUTPUT rules rewrite them.
        node.ip(&["route", "add", "default", "via", NOWHERE])?;
        pod.ip(&["link", "set", "eth0", "address", POD_MAC])?;
        pod.ip(&["neigh", "add", LINK_GW, "lladdr", GATEWAY_MAC, "dev", "eth0", "nud", "permanent"])?;
        pod.ip(&["route", "add", "default", "via", LINK_GW, "dev", "eth0", "onlink"])?;
        pod.ip(&["route", "add", "local", kube_proxy::CLUSTER_CIDR, "dev", "lo"])?;
        let client_ifindex = client.enter(|| nix::net::if_::if_nametoindex("eth0"))??;

        let server = (self.proto == Proto::Tcp)
            .then(|| {
                pod.cmd(agent_binary().with_file_name("lb-netcheck"))
                    .args(["http-close", "8080"])
                    .stdout(Stdio::null())
                    .spawn()
                    .context("starting the pod's server")
            })
            .transpose()?;
        // The TC lane's client pods, for pods' connections to services.
        let client_pods = match dataplane {
            Dataplane::AgentTc => vec![client_pod(&node, 1)?, client_pod(&node, 2)?],
            _ => Vec::new(),
        };
        let mut lane = Lane {
            dataplane,
            load: Duration::ZERO,
            agent: None,
            server,
            client,
            node,
            pod,
            client_pods,
            client_ifindex,
            cgroup: None,
            _bpffs: None,
        };
        let started = Instant::now();
        match dataplane {
            Dataplane::AgentTc | Dataplane::AgentXdp => {
                if dataplane == Dataplane::AgentTc {
                    attach(&mut self.floor, &lane.node, "floor_pass", XdpMode::Default)?;
                }
                let bpffs = Bpffs::new()?;
                let cgroup = Cgroup::new("cg")?;
                let agent = self.start_agent(&lane.node, &bpffs, &cgroup, dataplane)?;
                lane.agent = Some(agent);
                lane.cgroup = Some(cgroup);
                lane._bpffs = Some(bpffs);
            }
            Dataplane::Iptables => {
                attach(&mut self.floor, &lane.node, "floor_pass", XdpMode::Default)?;
                let rules = kube_proxy::iptables_rules(self.services, ENDPOINTS_PER_SERVICE, self.proto);
                feed(&lane.node, "iptables-restore", &[], &rules)?;
            }
            Dataplane::Nftables => {
                attach(&mut self.floor, &lane.node, "floor_pass", XdpMode::Default)?;
                let rules = kube_proxy::nft_rules(self.services, ENDPOINTS_PER_SERVICE, self.proto);
                feed(&lane.node, "nft", &["-f", "-"], &rules)?;
            }
        }
        lane.load = started.elapsed();
        Ok(lane)
    }

    /// Seconds each lane took to load its dataplane, in `Dataplane::ALL` order.
    pub fn load_secs(&self) -> [f64; DATAPLANES] {
        core::array::from_fn(|i| self.lanes[i].load.as_secs_f64())
    }

    fn start_agent(
        &self,
        node: &Netns,
        bpffs: &Bpffs,
        cgroup: &Cgroup,
        dataplane: Dataplane,
    ) -> Result<Agent> {
        let n = self.services;
        let per = ENDPOINTS_PER_SERVICE;
        let size = |x: u32| (x + 1024).next_power_of_two().to_string();
        let (frontends, backends) = (size(n), size(n * per));
        let manifests = self.manifests.to_string_lossy().into_owned();
        let pin = bpffs.dir.join("lb").to_string_lossy().into_owned();
        let cgroup_dir = cgroup.dir.to_string_lossy().into_owned();
        let args = [
            "run",
            "--manifests",
            &manifests,
            "--node-name",
            "bench",
            "--external-interface",
            "eth0",
            "--pod-interfaces",
            "pod*",
            "--pin-dir",
            &pin,
            "--max-frontends",
            &frontends,
            "--max-backends",
            &backends,
            "--max-slots",
            &backends,
            "--metrics-address",
            "127.0.0.1:0",
            "--health-address",
            "127.0.0.1:0",
            "--acceleration",
            if dataplane == Dataplane::AgentXdp { "xdp" } else { "tc" },
            "--cgroup-root",
            &cgroup_dir,
            // The TC lane's client pod measures both pod paths: outside the
            // cgroup per packet, inside it through the socket hooks.
            "--socket-lb",
            if dataplane == Dataplane::AgentTc { "all" } else { "host" },
        ];
        let agent = Agent::start_in(node, &args, Some(cgroup))?;
        let want = format!("synced frontends={n} ");
        if wait_for(Duration::from_secs(300), || agent.log().contains(&want).then_some(())).is_none() {
            bail!("agent did not program {n} services:\n{}", agent.log());
        }
        Ok(agent)
    }

    fn delivered(&self) -> Result<u64> {
        let count: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.floor.map("floor_count").context("count")?)?;
        Ok(count.get(&0, 0)?.iter().sum())
    }

    /// Packets per second through lane `i`: the generator sends to the
    /// services (`flows` = 0: every frame a new flow; else that many flows,
    /// opened before the clock starts) for at least `min` and the pod
    /// counts what arrives. `direct`: to as many pod addresses instead, so
    /// nothing is translated (the ceiling of forwarding alone).
    pub fn pps(&mut self, i: usize, flows: u32, min: Duration, direct: bool) -> Result<PpsRun> {
        ensure!(self.proto == Proto::Udp, "the generator sends UDP");
        // The generator's template: flow 0 (service 0, the lowest source port).
        let base = if direct { endpoints_of(0, 1)[0] } else { vip_of(0) };
        let frame = crate::packet::udp((bench::CLIENT, GEN_PORT_BASE), (base.octets(), 80), &[0u8; 18]);
        let config = GenConfig { vip_base: base.octets(), services: self.services, flows, _pad: 0 };
        let mut cfg: Array<_, GenConfig> = Array::try_from(self.floor.map_mut("gen_config").context("cfg")?)?;
        cfg.set(0, &config, 0)?;
        let template = Template::new(&frame).context("template")?;
        let mut t: Array<_, Template> =
            Array::try_from(self.floor.map_mut("floor_template").context("tmpl")?)?;
        t.set(0, &template, 0)?;
        let sink = attach(&mut self.floor, &self.lanes[i].pod, "floor_drop", XdpMode::Skb)?;

        let gen_prog: &Xdp = self.floor.program("floor_gen").context("floor_gen")?.try_into()?;
        let lane = &self.lanes[i];
        let send = |frames: u32| bench::live(gen_prog, &frame, lane.client_ifindex, frames).map(|_| ());
        let result = lane.client.enter(|| -> Result<PpsRun> {
            if flows > 0 {
                send(flows)?;
                std::thread::sleep(Duration::from_millis(50));
            }
            let before = self.delivered()?;
            let started = Instant::now();
            let mut sent = 0u64;
            while started.elapsed() < min {
                send(GEN_BATCH)?;
                sent += GEN_BATCH as u64;
            }
            let secs = started.elapsed().as_secs_f64();
            // Whatever is still queued lands within a few milliseconds.
            std::thread::sleep(Duration::from_millis(20));
            let delivered = self.delivered()? - before;
            Ok(PpsRun { sent, delivered, secs })
        })?;
        let p: &mut Xdp = self.floor.program_mut("floor_drop").context("floor_drop")?.try_into()?;
        p.detach(sink)?;
        let run = result?;
        ensure!(
            run.delivered > 0,
            "no frame reached the pod through {} ({} sent)",
            self.lanes[i].dataplane.name(),
            run.sent
        );
        Ok(run)
    }

    /// Short connections through lane `i`: `wrk` with `Connection: close`
    /// for `secs`, four threads on four services spread over the table
    /// (`direct`: on the first endpoint of each instead, untranslated).
    pub fn cps(&self, i: usize, secs: u32, direct: bool) -> Result<CpsRun> {
        self.wrk(&self.lanes[i].client, i, secs, direct)
    }

    /// The same from the node's own namespace (a host-network client):
    /// inside the agent's cgroup on the agent lanes, through the OUTPUT
    /// chains on the netfilter lanes.
    pub fn host_cps(&self, i: usize, secs: u32, direct: bool) -> Result<CpsRun> {
        let lane = &self.lanes[i];
        match &lane.cgroup {
            Some(cgroup) => self.wrk(&HostProcess { ns: &lane.node, cgroup }, i, secs, direct),
            None => self.wrk(&lane.node, i, secs, direct),
        }
    }

    /// The same from a client pod of the TC lane, whose agent runs
    /// `--socket-lb all`: `PerPacket` from a pod outside the agent's cgroup
    /// (the pod hook translates every packet), `Sockets` from one inside it
    /// (translated at connect()), `Ceiling` from that one straight to the
    /// pods' addresses. Two pods, so that a server's TIME_WAIT for one path
    /// never meets the other's connections (their TCP timestamps start from
    /// offsets that differ with the destination the client dialled).
    pub fn pod_cps(&self, secs: u32, path: PodPath) -> Result<CpsRun> {
        let i = Dataplane::ALL.iter().position(|d| *d == Dataplane::AgentTc).expect("a TC lane");
        let lane = &self.lanes[i];
        let (Some(cgroup), [outside, inside]) = (&lane.cgroup, &lane.client_pods[..]) else {
            bail!("the TC lane has two client pods and a cgroup")
        };
        match path {
            PodPath::PerPacket => self.wrk(outside, i, secs, false),
            PodPath::Sockets => self.wrk(&HostProcess { ns: inside, cgroup }, i, secs, false),
            PodPath::Ceiling => self.wrk(&HostProcess { ns: inside, cgroup }, i, secs, true),
        }
    }

    fn wrk(&self, from: &impl Place, i: usize, secs: u32, direct: bool) -> Result<CpsRun> {
        ensure!(self.proto == Proto::Tcp, "wrk needs the TCP services");
        let n = self.services;
        let targets: Vec<String> = (0..4)
            .map(|k| (2 * k + 1) * n / 8)
            .map(|svc| if direct { (endpoints_of(svc, 1)[0], 8080) } else { (vip_of(svc), 80) })
            .map(|(addr, port)| format!("{{ \"{addr}\", \"{port}\" }}"))
            .collect();
        let script = self.manifests.join("wrk.lua");
        std::fs::write(
            &script,
            format!(
                "local targets = {{ {} }}\nlocal next = 0\nfunction setup(thread)\n  next = next + 1\n  \
                 local t = targets[next]\n  thread.addr = wrk.lookup(t[1], t[2])[1]\nend\n\
                 wrk.headers[\"Connection\"] = \"close\"\n",
                targets.join(", ")
            ),
        )?;
        let lane = &self.lanes[i];
        let soft0 = softirq_secs()?;
        let out = run(from.cmd("wrk").args([
            "-t4",
            "-c64",
            &format!("-d{secs}s"),
            "--latency",
            "-s",
            &script.to_string_lossy(),
            &format!("http://{}/", vip_of(0)),
        ]))?;
        let softirq = softirq_secs()? - soft0;
        parse_wrk(&out, softirq).with_context(|| format!("wrk through {}:\n{out}", lane.dataplane.name()))
    }

    /// Seconds the netfilter lane `i` takes to apply kube-proxy's update for
    /// one endpoint of service `svc` replaced (`round` picks a fresh address).
    pub fn rule_change(&self, i: usize, svc: u32, round: u32) -> Result<Duration> {
        let old = endpoints_of(svc, ENDPOINTS_PER_SERVICE);
        let mut new = old.clone();
        new[0] = Ipv4Addr::new(10, 200, (round / 250) as u8, (round % 250) as u8 + 1);
        let lane = &self.lanes[i];
        // The input is written first; only the command is timed.
        let apply = |from: &[Ipv4Addr], to: &[Ipv4Addr]| -> Result<Duration> {
            let (program, args, input): (_, &[&str], _) = match lane.dataplane {
                Dataplane::Iptables => (
                    "iptables-restore",
                    &["--noflush"],
                    kube_proxy::iptables_change(self.services, svc, self.proto, from, to),
                ),
                Dataplane::Nftables => {
                    ("nft", &["-f", "-"], kube_proxy::nft_change(svc, self.proto, from, to))
                }
                Dataplane::AgentTc | Dataplane::AgentXdp => {
                    bail!("the agent's endpoint changes are timed by bench::control_plane")
                }
            };
            let started = Instant::now();
            feed(&lane.node, program, args, &input)?;
            Ok(started.elapsed())
        };
        let took = apply(&old, &new)?;
        // Back to the original endpoints, untimed, so every round starts alike.
        apply(&new, &old)?;
        Ok(took)
    }
}

/// Attaches the floor object's `program` to `eth0` in `ns`.
/// How a client pod reaches the services (`Lanes::pod_cps`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodPath {
    PerPacket,
    Sockets,
    Ceiling,
}

/// Client pod `k` on `node` (10.64.0.1 + k, veth `pod<k>`), wired as the server pod.
fn client_pod(node: &Netns, k: u8) -> Result<Netns> {
    let pod = Netns::new("q")?;
    let (host_if, addr) = (format!("pod{k}"), Ipv4Addr::new(10, 64, 0, 1 + k));
    veth(node, &host_if, &pod, "eth0")?;
    node.ip(&["link", "set", &host_if, "address", GATEWAY_MAC])?;
    node.ip(&["route", "add", &format!("{addr}/32"), "dev", &host_if])?;
    pod.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
    pod.ip(&["neigh", "add", LINK_GW, "lladdr", GATEWAY_MAC, "dev", "eth0", "nud", "permanent"])?;
    pod.ip(&["route", "add", "default", "via", LINK_GW, "dev", "eth0", "onlink"])?;
    Ok(pod)
}

fn attach(floor: &mut Ebpf, ns: &Netns, program: &str, mode: XdpMode) -> Result<XdpLinkId> {
    let p: &mut Xdp = floor.program_mut(program).context("floor program")?.try_into()?;
    ns.enter(|| p.attach(c"eth0", mode))?.with_context(|| format!("attaching {program}"))
}

/// Runs `program args` in `ns` with `input` on stdin.
fn feed(ns: &Netns, program: &str, args: &[&str], input: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = ns
        .cmd(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{program} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Softirq time of all CPUs so far, from the `cpu` line of /proc/stat.
pub fn softirq_secs() -> Result<f64> {
    let ticks = *bench::cpu_ticks()?.get(6).context("no softirq field in /proc/stat")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// Requests/sec (each a new connection), latency p50/p99 and errors from
/// `wrk --latency` output.
fn parse_wrk(out: &str, softirq_secs: f64) -> Result<CpsRun> {
    let field = |prefix: &str| out.lines().map(str::trim).find_map(|l| l.strip_prefix(prefix)).map(str::trim);
    let cps: f64 = field("Requests/sec:").context("no Requests/sec")?.parse()?;
    let connections: u64 = out
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .context("no request count")?
        .parse()?;
    let p50 = duration_ms(field("50%").context("no p50")?)?;
    let p99 = duration_ms(field("99%").context("no p99")?)?;
    let mut errors = 0;
    if let Some(e) = field("Socket errors:") {
        errors +=
            e.split(',').filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok()).sum::<u64>();
    }
    if let Some(e) = field("Non-2xx or 3xx responses:") {
        errors += e.parse::<u64>()?;
    }
    Ok(CpsRun { cps, p50_ms: p50, p99_ms: p99, errors, softirq_secs, connections })
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.00s`.
fn duration_ms(s: &str) -> Result<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic()).context("duration without unit")?;
    let (v, unit) = s.split_at(split);
    let v: f64 = v.parse()?;
    Ok(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        other => bail!("unknown unit {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let out = "Running 3s test @ http://10.96.0.0/\n  4 threads and 64 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     2.10ms    1.00ms  20.00ms   90.00%\n  Latency Distribution\n     50%  812.00us\n     75%    2.00ms\n     90%    3.00ms\n     99%    1.20s\n  30000 requests in 3.00s, 2.00MB read\n  Socket errors: connect 0, read 3, write 0, timeout 1\nRequests/sec:  10000.50\nTransfer/sec:    1.00MB\n";
        let r = parse_wrk(out, 0.5).unwrap();
        assert_eq!((r.cps, r.connections, r.errors), (10000.5, 30000, 4));
        assert_eq!((r.p50_ms, r.p99_ms), (0.812, 1200.0));
    }
}
