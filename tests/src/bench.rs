//! Measurements for `cargo xtask bench` (see shared BENCHMARKING notes in
//! the README): per-packet cost in live-frames mode against floor programs,
//! the first packet of a new flow by alternating single runs, and the
//! control plane against iptables-restore and nft.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp},
};
use lb_common::{FrontendKind, L4, floor::Template};
use lb_userspace::{
    frontend::Frontend,
    loader::{self, Capacities, FLOOR_OBJECT, XDP_PROGRAM},
    maps::Maps,
    model::{Desired, DesiredBackend, DesiredFrontend},
    reconciler::{self, NodeSettings, Reconciler, keys},
};

use crate::{
    netns::{Bpffs, Netns},
    packet::tcp,
};

pub const NODE: [u8; 4] = [192, 0, 2, 11];
pub const CLIENT: [u8; 4] = [192, 0, 2, 100];
/// Where the Wire routes the synthetic backends, and that hop's MAC.
pub const NEXT_HOP: &str = "192.0.2.12";
pub const NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];

/// Waits (at most `max`) until the machine is idle: under 10% of its CPU
/// time busy over half a second. Tearing down namespaces with large rule
/// sets or many closed connections keeps the kernel busy for a while after
/// they are gone, which would slow whatever is measured next.
pub fn wait_quiet(max: Duration) -> Result<Duration> {
    // (all time, idle + iowait time) of all CPUs.
    let sample = || -> Result<(u64, u64)> {
        let t = cpu_ticks()?;
        Ok((t.iter().sum(), t.get(3).copied().unwrap_or(0) + t.get(4).copied().unwrap_or(0)))
    };
    let started = Instant::now();
    while started.elapsed() < max {
        let (total0, idle0) = sample()?;
        std::thread::sleep(Duration::from_millis(500));
        let (total1, idle1) = sample()?;
        let total = (total1 - total0).max(1);
        let busy = total.saturating_sub(idle1 - idle0);
        if (busy as f64) / (total as f64) < 0.10 {
            break;
        }
    }
    Ok(started.elapsed())
}

/// The `cpu` line of /proc/stat: user, nice, system, idle, iowait, irq,
/// softirq, steal... in clock ticks, all CPUs together.
pub fn cpu_ticks() -> Result<Vec<u64>> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    Ok(line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>()?)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `n` ClusterIP services (10.96.0.0/16 and up) with `per` remote backends each.
pub fn synthetic(n: u32, per: u32) -> Desired {
    let mut d = Desired::default();
    for i in 0..n {
        let vip = vip_of(i);
        let backends = endpoints_of(i, per)
            .into_iter()
            .map(|addr| DesiredBackend { addr: addr.into(), port: 8080, local: false })
            .collect();
        d.frontends.insert(
            Frontend::new(vip, 80, L4::Tcp),
            std::sync::Arc::new(DesiredFrontend::new(
                &format!("bench/svc-{i}"),
                FrontendKind::ClusterIp,
                backends,
            )),
        );
    }
    d
}

/// A namespace where live frames can really be transmitted: `ext0` (the
/// program's interface) paired with `ext1`, which runs `floor_restore`, so
/// XDP_TX frames are delivered (a veth needs XDP or GRO on the peer), then
/// written back to the input frame before their page is reused (live
/// frames keep what a program wrote) and dropped; routes and neighbours so
/// the FIB lookup resolves.
pub struct Wire {
    pub ns: Netns,
    pub ifindex: u32,
    template: Mutex<Array<MapData, Template>>,
    floor: Ebpf,
}

impl Wire {
    pub fn new() -> Result<Self> {
        let ns = Netns::new("b")?;
        // A node forwards; the FIB helper refuses otherwise.
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.ip(&["link", "add", "name", "ext0", "type", "veth", "peer", "name", "ext1"])?;
        // The client's address is not local here (ext1 has none), so replies
        // to it are routed, like the requests, back out of ext0.
        ns.ip(&["addr", "add", "192.0.2.11/24", "dev", "ext0"])?;
        for i in ["ext0", "ext1"] {
            ns.ip(&["link", "set", i, "up"])?;
        }
        // Remote pods via a neighbour on ext0 (a permanent entry: nobody answers ARP here).
        let mac = NEXT_HOP_MAC.map(|b| format!("{b:02x}")).join(":");
        ns.ip(&["neigh", "add", NEXT_HOP, "lladdr", &mac, "dev", "ext0", "nud", "permanent"])?;
        ns.ip(&[
            "neigh",
            "replace",
            "192.0.2.100",
            "lladdr",
            "02:00:00:00:00:64",
            "dev",
            "ext0",
            "nud",
            "permanent",
        ])?;
        ns.ip(&["route", "add", "10.128.0.0/10", "via", NEXT_HOP, "dev", "ext0"])?;
        let mut floor = Ebpf::load(FLOOR_OBJECT)?;
        let sink: &mut Xdp = floor.program_mut("floor_restore").context("floor_restore")?.try_into()?;
        sink.load()?;
        let ifindex = ns.enter(|| -> Result<u32> {
            sink.attach(c"ext1", aya::programs::XdpMode::Default)?;
            Ok(nix::net::if_::if_nametoindex("ext0")?)
        })??;
        let template =
            Mutex::new(Array::try_from(floor.take_map("floor_template").context("floor_template")?)?);
        Ok(Self { ns, ifindex, template, floor })
    }
}

impl Wire {
    /// Frames the peer has received so far.
    pub fn sunk(&self) -> Result<u64> {
        let count: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(self.floor.map("floor_count").context("floor_count")?)?;
        Ok(count.get(&0, 0)?.iter().sum())
    }

    /// Mean ns per frame of `p` over `frames` live frames of `frame`, each
    /// one really starting as `frame`; from a thread inside `ns`.
    pub fn live(&self, p: &Xdp, frame: &[u8], frames: u32) -> Result<f64> {
        let template = Template::new(frame).context("frame longer than a template")?;
        self.template.lock().map_err(|_| anyhow::anyhow!("template lock"))?.set(0, &template, 0)?;
        live(p, frame, self.ifindex, frames)
    }

    /// `live` for a program that sends every frame back out (XDP_TX):
    /// fails unless the peer received them all, so that a transmit path
    /// that loses frames is never measured as a fast one.
    pub fn live_tx(&self, p: &Xdp, frame: &[u8], frames: u32) -> Result<f64> {
        let before = self.sunk()?;
        let ns = self.live(p, frame, frames)?;
        let delivered = self.sunk()? - before;
        anyhow::ensure!(
            delivered >= frames as u64,
            "only {delivered} of {frames} XDP_TX frames reached the peer: the measurement would be of a loss"
        );
        Ok(ns)
    }
}

fn xdp_md(ifindex: u32, len: usize) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// Mean ns per frame over `frames` live frames (each re-initialised).
pub fn live(p: &Xdp, frame: &[u8], ifindex: u32, frames: u32) -> Result<f64> {
    let ctx = xdp_md(ifindex, frame.len());
    let r = p.test_run(TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        repeat: frames,
        attrs: TestRunAttrs::new().xdp_live_frames(64),
        ..Default::default()
    })?;
    Ok(r.duration.as_nanos() as f64)
}

/// One plain run with `ingress` as the receiving interface (so the FIB
/// helper works), from a thread inside its namespace: (action, frame out).
pub fn run_on(p: &Xdp, frame: &[u8], ingress: u32) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let r = p.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&xdp_md(ingress, frame.len())),
        ..Default::default()
    })?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

/// One plain run: (action, ns).
pub fn single(p: &Xdp, frame: &[u8]) -> Result<(u32, f64)> {
    let mut out = vec![0u8; frame.len() + 256];
    let r =
        p.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() })?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

/// The load balancer with `n` services programmed, on a private bpffs.
pub struct Loaded {
    pub ebpf: Ebpf,
    _bpffs: Bpffs,
}

fn caps_for(n: u32, per: u32) -> Capacities {
    let mut caps = Capacities::default();
    caps.set("max-frontends", (n + 1024).next_power_of_two())
        .set("max-backends", (n * per + 1024).next_power_of_two())
        .set("max-slots", (n * per + 1024).next_power_of_two())
        .set("max-endpoints", (n * per + 1024).next_power_of_two());
    caps
}

fn plan_synthetic(n: u32, per: u32) -> Result<Vec<reconciler::Op>> {
    let node = std::net::IpAddr::from(NODE);
    let settings = NodeSettings {
        addresses: BTreeSet::from([node]),
        snat_addr: node,
        nat_ports: (61000, 65535),
        via_stack: false,
        service_cidrs: Vec::new(),
    };
    // Planned for the maps' real sizes (the registry's defaults hold fewer),
    // and all of it: a measurement of services left out would be of misses.
    let caps = caps_for(n, per);
    let mut r = Reconciler::with_limits(reconciler::Limits::from_capacity(|m| caps.of(m)));
    let ops = r.plan(&synthetic(n, per), &settings)?;
    anyhow::ensure!(
        r.overflow().is_empty(),
        "{} of {n} services left out: {:?}",
        r.overflow().len(),
        r.overflow().values().next()
    );
    Ok(ops)
}

pub fn load_lb(n: u32, per: u32) -> Result<(Loaded, Duration)> {
    let bpffs = Bpffs::new()?;
    let mut ebpf = loader::load(&bpffs.dir.join("lb"), &caps_for(n, per), Default::default())?;
    lb_userspace::attach::load_programs(&mut ebpf)?;
    let mut maps = Maps::from_ebpf(&mut ebpf)?;
    let started = Instant::now();
    reconciler::apply(&mut maps, &plan_synthetic(n, per)?)?;
    Ok((Loaded { ebpf, _bpffs: bpffs }, started.elapsed()))
}

/// Another build of `lb-ebpf` (say, the previous commit's), with the same
/// services: the reconciler's writes go by name to the maps the XDP path
/// reads, so a build whose maps kept those layouts can be measured beside
/// this one; writes to maps it does not have (names, affinity, source
/// ranges) are skipped.
pub fn load_baseline(object: &[u8], n: u32, per: u32) -> Result<Loaded> {
    let bpffs = Bpffs::new()?;
    let mut ebpf = loader::load_object(object, &bpffs.dir.join("lb"), &caps_for(n, per), Default::default())?;
    // Only the program measured: an older build may lack the others.
    let xdp: &mut Xdp =
        ebpf.program_mut(loader::XDP_PROGRAM).context("the baseline's XDP program")?.try_into()?;
    xdp.load().context("loading the baseline's XDP program")?;
    let mut maps = BaselineMaps {
        services: aya::maps::HashMap::try_from(ebpf.take_map("lb_services").context("lb_services")?)?,
        backends: aya::maps::HashMap::try_from(ebpf.take_map("lb_backends").context("lb_backends")?)?,
        slots: aya::maps::HashMap::try_from(ebpf.take_map("lb_slots").context("lb_slots")?)?,
        node_addrs: aya::maps::HashMap::try_from(ebpf.take_map("lb_node_addrs").context("lb_node_addrs")?)?,
        config: Array::try_from(ebpf.take_map("lb_config").context("lb_config")?)?,
    };
    for op in plan_synthetic(n, per)? {
        maps.apply(&op)?;
    }
    Ok(Loaded { ebpf, _bpffs: bpffs })
}

struct BaselineMaps {
    services: aya::maps::HashMap<MapData, lb_common::FrontendKey, lb_common::Frontend>,
    backends: aya::maps::HashMap<MapData, u32, lb_common::Backend>,
    slots: aya::maps::HashMap<MapData, lb_common::SlotKey, u32>,
    node_addrs: aya::maps::HashMap<MapData, [u8; 4], u32>,
    config: Array<MapData, lb_common::Config>,
}

impl BaselineMaps {
    fn apply(&mut self, op: &reconciler::Op) -> Result<()> {
        use reconciler::Op;
        match op {
            Op::PutConfig(c) => self.config.set(0, c, 0)?,
            Op::PutNodeAddr(a) => self.node_addrs.insert(a, &1, 0)?,
            Op::PutBackend(id, b) => self.backends.insert(id, b, 0)?,
            Op::PutSlot(k, b) => self.slots.insert(k, b, 0)?,
            Op::PutFrontend(k, v) => self.services.insert(k, v, 0)?,
            _ => {}
        }
        Ok(())
    }
}

pub struct PacketCosts {
    pub services: u32,
    pub not_service: f64,
    pub established: f64,
    pub reply: f64,
    pub floor_tx: f64,
    pub floor_pass: f64,
    /// XDP actions of an established packet and of a reply (both XDP_TX).
    pub actions: (u32, u32),
    /// The baseline object's established packet and reply, when one is measured.
    pub baseline: Option<(f64, f64)>,
}

/// The measured flow, opened on one program.
struct Flow {
    /// XDP actions of its established packet and of the reply.
    actions: (u32, u32),
    established: Vec<u8>,
    /// The backend's reply, to the NAT port the program chose.
    reply: Vec<u8>,
}

fn open_flow(wire: &Wire, p: &Xdp, vip: [u8; 4]) -> Result<Flow> {
    let syn = tcp((CLIENT, 40000), (vip, 80), "S", b"");
    let est = tcp((CLIENT, 40000), (vip, 80), "A", b"");
    wire.ns.enter(|| -> Result<_> {
        single(p, &syn)?;
        let (action, out) = run_on(p, &est, wire.ifindex)?;
        let seen = crate::packet::parse_checked(&out);
        let reply = tcp(seen.dst, seen.src, "A", b"");
        let (reply_action, _) = run_on(p, &reply, wire.ifindex)?;
        Ok(Flow { actions: (action, reply_action), established: est, reply })
    })?
}

/// Live-frames medians for one service count, floors (and a baseline
/// build, if given) measured alongside, round by round.
pub fn packet_costs(
    wire: &Wire,
    floor: &Ebpf,
    baseline: Option<&[u8]>,
    n: u32,
    frames: u32,
    rounds: usize,
) -> Result<PacketCosts> {
    let (lb, _) = load_lb(n, 10)?;
    let p: &Xdp = lb.ebpf.program(XDP_PROGRAM).context("lb_xdp")?.try_into()?;
    let tx: &Xdp = floor.program("floor_tx").context("floor_tx")?.try_into()?;
    let pass: &Xdp = floor.program("floor_pass").context("floor_pass")?.try_into()?;
    // A service in the middle of the table; open its flow once.
    let vip = vip_of(n / 2).octets();
    let other = tcp((CLIENT, 40000), ([192, 0, 2, 50], 80), "A", b"");
    let Flow { actions, established: est, reply } = open_flow(wire, p, vip)?;
    let base = baseline.map(|object| load_baseline(object, n, 10)).transpose()?;
    let base = match &base {
        Some(b) => {
            let bp: &Xdp = b.ebpf.program(XDP_PROGRAM).context("baseline lb_xdp")?.try_into()?;
            let flow = open_flow(wire, bp, vip)?;
            anyhow::ensure!(
                flow.actions == actions,
                "the baseline acts otherwise: {:?} vs {actions:?}",
                flow.actions
            );
            Some((bp, flow.reply))
        }
        None => None,
    };
    let mut figures: [Vec<f64>; 7] = Default::default();
    wire.ns.enter(|| -> Result<()> {
        // Round 0 warms caches and the page pool, and is not kept.
        for round in 0..=rounds {
            let mut run = vec![
                wire.live(p, &other, frames)?,
                wire.live_tx(p, &est, frames)?,
                wire.live_tx(p, &reply, frames)?,
                wire.live_tx(tx, &est, frames)?,
                wire.live(pass, &est, frames)?,
            ];
            if let Some((bp, base_reply)) = &base {
                run.push(wire.live_tx(bp, &est, frames)?);
                run.push(wire.live_tx(bp, base_reply, frames)?);
            }
            if round > 0 {
                for (v, x) in figures.iter_mut().zip(run) {
                    v.push(x);
                }
            }
        }
        Ok(())
    })??;
    let [a, b, c, d, e, f, g] = figures;
    Ok(PacketCosts {
        services: n,
        not_service: median(a),
        established: median(b),
        reply: median(c),
        floor_tx: median(d),
        floor_pass: median(e),
        actions,
        baseline: base.is_some().then(|| (median(f), median(g))),
    })
}

/// First packet of a new flow: alternating single runs of a SYN from a new
/// source port and of the parse-and-TX floor; difference of medians.
pub fn new_flow_cost(floor: &Ebpf, n: u32, samples: u32) -> Result<(f64, f64)> {
    let (lb, _) = load_lb(n, 10)?;
    let p: &Xdp = lb.ebpf.program(XDP_PROGRAM).context("lb_xdp")?.try_into()?;
    let tx: &Xdp = floor.program("floor_tx").context("floor_tx")?.try_into()?;
    let vip = vip_of(n / 2).octets();
    let (mut syn, mut base) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let sport = 1024 + (i % 60_000) as u16;
        let client = [192, 0, 2, 100 + (i / 60_000) as u8];
        syn.push(single(p, &tcp((client, sport), (vip, 80), "S", b""))?.1);
        base.push(single(tx, &tcp((client, sport), (vip, 80), "S", b""))?.1);
    }
    Ok((median(syn), median(base)))
}

/// Manifests for `n` services × `per` endpoints in files of 100 services.
pub fn write_manifests(dir: &Path, n: u32, per: u32, proto: Proto, node: Option<&str>) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for file in 0..n.div_ceil(100) {
        let mut text = String::new();
        for i in file * 100..((file + 1) * 100).min(n) {
            text.push_str(&service_yaml(i, proto, node, &endpoints_of(i, per)));
        }
        std::fs::write(dir.join(format!("svc-{file:04}.yaml")), text)?;
    }
    Ok(())
}

/// Synthetic service `i`'s cluster IP: 10.96.0.0 + i.
pub fn vip_of(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i)
}

/// Synthetic service `i`'s endpoints: `per` addresses from 10.128.0.0 + i × per.
pub fn endpoints_of(i: u32, per: u32) -> Vec<Ipv4Addr> {
    (0..per).map(|j| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * per + j)).collect()
}

/// The protocol of the synthetic services' one port (80 → 8080).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// Service `i` and its EndpointSlice (endpoints on `node` if given).
pub fn service_yaml(i: u32, proto: Proto, node: Option<&str>, endpoints: &[Ipv4Addr]) -> String {
    let vip = vip_of(i);
    let protocol = proto.name().to_uppercase();
    let node = node.map(|n| format!(", nodeName: {n}")).unwrap_or_default();
    let eps: String = endpoints.iter().map(|e| format!("  - {{addresses: [\"{e}\"]{node}}}\n")).collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec:\n  clusterIP: {vip}\n  \
         ports: [{{port: 80, targetPort: 8080, protocol: {protocol}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: svc-{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
         addressType: IPv4\nports: [{{port: 8080, protocol: {protocol}}}]\nendpoints:\n{eps}"
    )
}

pub struct ControlPlane {
    pub services: u32,
    pub startup: Duration,
    pub change_p50: Duration,
    pub change_p99: Duration,
    pub changes: usize,
    pub peak_rss_kib: u64,
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// The real agent from `n` × 10 manifests: time to all programmed, then
/// `changes` endpoint replacements timed from the file write to the map.
pub fn control_plane(wire: &Wire, n: u32, changes: usize) -> Result<ControlPlane> {
    let per = 10;
    let bpffs = Bpffs::new()?;
    let pin = bpffs.dir.join("lb");
    let dir = crate::netns::TempDir::new("cp")?;
    write_manifests(&dir, n, per, Proto::Tcp, None)?;
    // The service whose endpoints change lives in its own file.
    let probe = n - 1;
    std::fs::remove_file(dir.join(format!("svc-{:04}.yaml", probe / 100))).ok();
    let mut rest = String::new();
    for i in (probe / 100) * 100..probe {
        rest.push_str(&service_yaml(i, Proto::Tcp, None, &endpoints_of(i, per)));
    }
    std::fs::write(dir.join(format!("svc-{:04}.yaml", probe / 100)), rest)?;
    let mut eps = endpoints_of(probe, per);
    std::fs::write(dir.join("probe.yaml"), service_yaml(probe, Proto::Tcp, None, &eps))?;

    let started = Instant::now();
    let args: Vec<String> = [
        "run",
        "--manifests",
        &dir.to_string_lossy(),
        "--node-name",
        "bench",
        "--external-interface",
        "ext0",
        "--pin-dir",
        &pin.to_string_lossy(),
        "--max-frontends",
        &(n + 1024).next_power_of_two().to_string(),
        "--max-backends",
        &(n * per + 1024).next_power_of_two().to_string(),
        "--max-slots",
        &(n * per + 1024).next_power_of_two().to_string(),
        "--metrics-address",
        "127.0.0.1:0",
        "--health-address",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = crate::netns::Agent::start(&wire.ns, &args)?;
    let want = format!("synced frontends={n} ");
    let synced =
        crate::netns::wait_for(Duration::from_secs(300), || agent.log().contains(&want).then_some(()));
    if synced.is_none() {
        bail!("agent did not program {n} services:\n{}", agent.log());
    }
    let startup = started.elapsed();

    let maps = Maps::open_pinned(&pin)?;
    let vip = vip_of(probe).octets();
    let slot0 = |maps: &Maps| -> Option<[u8; 4]> {
        let fe = maps.services.get(&keys::frontend_key(&Frontend::new(vip, 80, L4::Tcp)).ok()?, 0).ok()?;
        let id = maps.slots.get(&lb_common::SlotKey { frontend_id: fe.id, slot: 0 }, 0).ok()?;
        Some(maps.backends.get(&id, 0).ok()?.addr)
    };
    let mut latencies = Vec::new();
    for k in 0..changes {
        let current = slot0(&maps).context("probe service programmed")?;
        let fresh = Ipv4Addr::new(10, 200, (k / 250) as u8, (k % 250) as u8 + 1);
        let at = eps.iter().position(|e| e.octets() == current).context("slot 0 endpoint")?;
        eps[at] = fresh;
        let tmp = dir.join(".probe.tmp");
        std::fs::write(&tmp, service_yaml(probe, Proto::Tcp, None, &eps))?;
        let t0 = Instant::now();
        std::fs::rename(&tmp, dir.join("probe.yaml"))?;
        loop {
            if slot0(&maps) == Some(fresh.octets()) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("endpoint change {k} not applied in 30 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        latencies.push(t0.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    let peak = status_kib(agent.child.id(), "VmHWM:");
    drop(agent);
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    Ok(ControlPlane {
        services: n,
        startup,
        change_p50: pct(0.5),
        change_p99: pct(0.99),
        changes,
        peak_rss_kib: peak,
    })
}
