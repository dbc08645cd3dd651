//! `cargo xtask bench [--quick]`: measures the dataplane and the agent and
//! writes BENCHMARKS.md (or, with --quick, a short smoke run to the path
//! given with --output). Run as root.

use std::{
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::Ebpf;
use lb_tests::{
    bench::{self, Proto, median},
    lanes::{CpsRun, DATAPLANES, Dataplane, Lanes, PodPath, PpsRun},
};

/// Lane and column indexes, in `Dataplane::ALL` order.
const TC: usize = 0;
const XDP: usize = 1;
const IPT: usize = 2;
const NFT: usize = 3;
use lb_userspace::loader::FLOOR_OBJECT;

/// Longest wait for an idle machine before a block of measurements (the
/// smoke run, beside other tests, waits a moment only: its figures are not
/// kept).
const QUIET: Duration = Duration::from_secs(60);
const QUIET_QUICK: Duration = Duration::from_secs(1);
const NEW_FLOWS: &str = "new flow per frame";
const ESTABLISHED: &str = "one flow per service";

struct Plan {
    services: Vec<u32>,
    frames: u32,
    rounds: usize,
    new_flow_samples: u32,
    control_services: u32,
    changes: usize,
    /// Service counts of the forwarding lanes (parts 2 and 3).
    lane_services: Vec<u32>,
    lane_rounds: usize,
    pps_time: Duration,
    cps_secs: u32,
    rule_changes: u32,
}

fn main() -> Result<()> {
    lb_tests::require_root();
    lb_tests::netns::cleanup_on_interrupt();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let output = args
        .iter()
        .position(|a| a == "--output")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("BENCHMARKS.md"));
    // Another build of lb-ebpf to measure beside this one in part 1 (say,
    // the previous release's); `--only packets` stops after part 1.
    let baseline = match args.iter().position(|a| a == "--baseline-object").and_then(|i| args.get(i + 1)) {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("reading {path}"))?),
        None => None,
    };
    let only_packets = args.windows(2).any(|w| w[0] == "--only" && w[1] == "packets");
    let plan = if quick {
        Plan {
            services: vec![1, 1000],
            frames: 20_000,
            rounds: 3,
            new_flow_samples: 500,
            control_services: 1000,
            changes: 10,
            lane_services: vec![100],
            lane_rounds: 1,
            pps_time: Duration::from_millis(200),
            cps_secs: 1,
            rule_changes: 2,
        }
    } else {
        Plan {
            services: vec![1, 1000, 10_000, 100_000],
            frames: 1_000_000,
            rounds: 7,
            new_flow_samples: 20_000,
            control_services: 10_000,
            changes: 100,
            lane_services: vec![100, 1000, 10_000],
            lane_rounds: 5,
            pps_time: Duration::from_secs(1),
            cps_secs: 3,
            rule_changes: 5,
        }
    };
    let quiet = if quick { QUIET_QUICK } else { QUIET };
    let started = Instant::now();
    let mut md = String::new();
    writeln!(md, "# Benchmarks\n")?;
    writeln!(
        md,
        "Written by `cargo xtask bench{}`; every figure below comes from that one run.\n",
        if quick { " --quick" } else { "" }
    )?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim().to_string();
    let cpus = std::thread::available_parallelism()?.get();
    let model = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    writeln!(md, "Machine: {model}, {cpus} CPUs, Linux {kernel}.\n")?;

    // 1. Per-packet cost.
    eprintln!("bench: per-packet cost");
    let wire = bench::Wire::new()?;
    let mut floor = Ebpf::load(FLOOR_OBJECT)?;
    for p in ["floor_tx", "floor_pass"] {
        let x: &mut aya::programs::Xdp = floor.program_mut(p).context("floor")?.try_into()?;
        x.load()?;
    }
    writeln!(md, "## 1. Per-packet cost of `lb_xdp` (live frames)\n")?;
    writeln!(
        md,
        "Method: `BPF_PROG_TEST_RUN` in live-frames mode (the program's action really carried out) on a veth in \
         a private namespace whose peer runs `floor_restore`: XDP_TX frames are delivered, written back to the \
         input frame and dropped. Live frames recycle their pages with whatever was written into them, so without \
         that write-back a program that rewrites packets is measured on its own output after the first 64 \
         frames (here: the not-a-service path). Each service has 10 remote backends; the flow measured belongs to \
         a service in the middle of the table. For each service count, after a warm-up round, the load balancer \
         and the floors run alternately, {} rounds of {} frames; the table gives medians in ns per frame, the \
         peer's work included (the same for the floor TX). *Established*: DNAT + SNAT (remote backend) + FIB \
         lookup + XDP_TX. *Reply*: the backend's reply translated back + XDP_TX. *Floor TX*: parse \
         Ethernet/IPv4/TCP, swap MACs, XDP_TX. *Floor PASS*: XDP_PASS to the namespace stack.\n",
        plan.rounds, plan.frames
    )?;
    if baseline.is_some() {
        writeln!(
            md,
            "*Baseline*: another build of lb-ebpf (`--baseline-object`), loaded with the same services and measured \
             in the same rounds, its established packet and reply alternating with this build's.\n"
        )?;
    }
    let extra = if baseline.is_some() {
        " baseline established | baseline reply | established ÷ baseline |"
    } else {
        ""
    };
    writeln!(
        md,
        "| services | not a service (pass) | established | reply | floor TX | floor PASS | established ÷ floor TX |{extra}"
    )?;
    writeln!(
        md,
        "|---:|---:|---:|---:|---:|---:|---:|{}",
        if baseline.is_some() { "---:|---:|---:|" } else { "" }
    )?;
    let mut established = Vec::new();
    let mut ratio_max = 0f64;
    for &n in &plan.services {
        eprintln!("bench:   {n} services");
        let c = bench::packet_costs(&wire, &floor, baseline.as_deref(), n, plan.frames, plan.rounds)?;
        anyhow::ensure!(
            c.actions == (3, 3),
            "established or reply packet not sent with XDP_TX: {:?}",
            c.actions
        );
        let vs = c.baseline.map_or(String::new(), |(est, reply)| {
            format!(" {est:.0} | {reply:.0} | {:.3} |", c.established / est)
        });
        writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |{vs}",
            c.services,
            c.not_service,
            c.established,
            c.reply,
            c.floor_tx,
            c.floor_pass,
            c.established / c.floor_tx
        )?;
        established.push(c.established);
        ratio_max = ratio_max.max(c.established / c.floor_tx);
    }
    let (lo, hi) = established.iter().fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    let spread = (hi - lo) / lo * 100.0;
    writeln!(md, "\nEstablished-flow spread across service counts: {spread:.1}%.\n")?;
    if only_packets {
        std::fs::write(&output, &md)?;
        eprintln!("bench: part 1 only, written to {}", output.display());
        return Ok(());
    }

    eprintln!("bench: new flows");
    let n = *plan.services.last().expect("service counts");
    let (syn, base) = bench::new_flow_cost(&floor, n, plan.new_flow_samples)?;
    writeln!(md, "### First packet of a new flow\n")?;
    writeln!(
        md,
        "Method: {} alternating single runs (plain mode, one packet each) of a SYN from a new source port and of \
         the floor TX program on the same frame, {n} services; medians include the test-run overhead, which the \
         difference removes.\n\n| SYN (new flow) | floor TX | new-flow cost |\n|---:|---:|---:|\n| {syn:.0} ns | {base:.0} ns | {:.0} ns |\n",
        plan.new_flow_samples,
        syn - base
    )?;

    // The agent's control plane, measured now, before the lanes of parts 2 and
    // 3 exist (their teardown keeps the kernel busy for a while); written in
    // part 4.
    eprintln!("bench: control plane");
    bench::wait_quiet(quiet)?;
    let cp = bench::control_plane(&wire, plan.control_services, plan.changes)?;

    // 2. Packets per second through a node.
    let mut raw = String::new();
    let mut lane_loads: Vec<(Proto, u32, [f64; DATAPLANES])> = Vec::new();
    let max_lane = *plan.lane_services.last().expect("lane service counts");
    writeln!(md, "## 2. Packets per second forwarded by a node\n")?;
    writeln!(
        md,
        "Method: four identical lanes of namespaces, client → node → pod (`tests/src/lanes.rs`), veths with the \
         kernel's default offloads (none turned off), the node running one dataplane each: the real `lb-agent` \
         on its TC path (`--acceleration tc`: the north-south program at TC ingress of the node's eth0, packets \
         for the pod redirected into it with `bpf_redirect_peer`; what a veth or VM NIC gets by default) or on \
         its XDP path (`--acceleration xdp`: the program at XDP, local backends passed to the node's stack), \
         kube-proxy's iptables-mode rules loaded with iptables-restore ({ipt}), or its nftables-mode table loaded \
         with `nft -f` ({nft}); rule sets in `tests/src/kube_proxy.rs`. N ClusterIP services, each UDP port 80 with \
         10 endpoints on this node (target port 8080). The generator `floor_gen` runs in live-frames mode on the \
         client's eth0 on one CPU, rewriting a 60-byte UDP frame per frame (service address and source port, \
         checksums updated) and sending it with XDP_TX; a veth delivers XDP_TX frames only to a peer that runs \
         XDP, so the node's eth0 runs `floor_pass` in every lane but the XDP one (which has `lb_xdp` there). The \
         pod counts and drops what arrives with `floor_drop` in generic XDP mode, which sees packets whether \
         they came through the veth or were redirected into the pod. *New flow per frame*: no 5-tuple repeats \
         within the run. *One flow per service*: N flows, opened before the clock starts, frames round-robin over \
         them. Each figure is the median of {rounds} runs of ≥ {secs:.1} s, the four lanes alternating run by run; \
         pps counts frames that reached the pod. *Ceiling*: the same generator to as many pod addresses through the \
         TC lane's node, nothing translated (the node's stack forwards them), in the same rounds; *offered*: what \
         the generator sent per second in the TC lane's runs. The generator's rate depends on how fast the pages \
         of its frames come back, so it falls with the work behind it; a lane that delivers all it is offered \
         has not reached its own limit. Before each block of runs the benchmark waits (up to a \
         minute) for the machine to be idle: tearing down the previous lanes keeps the kernel busy for a while.\n",
        ipt = tool_version("iptables", "-V"),
        nft = tool_version("nft", "--version"),
        rounds = plan.lane_rounds,
        secs = plan.pps_time.as_secs_f64(),
    )?;
    writeln!(
        md,
        "| services | traffic | TC pps | XDP pps | iptables pps | nftables pps | ceiling | TC offered | TC ÷ ipt | TC ÷ nft | XDP ÷ ipt | XDP ÷ nft |"
    )?;
    writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut pps_at_max: Vec<(&str, [f64; DATAPLANES])> = Vec::new();
    for &n in &plan.lane_services {
        eprintln!("bench: packets per second, {n} services");
        bench::wait_quiet(quiet)?;
        let mut lanes = Lanes::new(n, Proto::Udp)?;
        bench::wait_quiet(quiet)?;
        lane_loads.push((Proto::Udp, n, lanes.load_secs()));
        for (kind, flows) in [(NEW_FLOWS, 0), (ESTABLISHED, n)] {
            let mut runs: [Vec<PpsRun>; DATAPLANES] = Default::default();
            let mut ceiling = Vec::new();
            for _ in 0..plan.lane_rounds {
                for (i, r) in runs.iter_mut().enumerate() {
                    r.push(lanes.pps(i, flows, plan.pps_time, false)?);
                }
                ceiling.push(lanes.pps(TC, flows, plan.pps_time, true)?);
            }
            let pps = runs.each_ref().map(|r| median(r.iter().map(PpsRun::pps).collect()));
            let top = median(ceiling.iter().map(PpsRun::pps).collect());
            let offered = median(runs[TC].iter().map(PpsRun::offered).collect());
            writeln!(
                md,
                "| {n} | {kind} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                kilo(pps[TC]),
                kilo(pps[XDP]),
                kilo(pps[IPT]),
                kilo(pps[NFT]),
                kilo(top),
                kilo(offered),
                pps[TC] / pps[IPT],
                pps[TC] / pps[NFT],
                pps[XDP] / pps[IPT],
                pps[XDP] / pps[NFT],
            )?;
            let list: Vec<String> = ceiling.iter().map(|x| format!("{:.0} pps", x.pps())).collect();
            writeln!(raw, "- pps, {n} services, {kind}, ceiling (no translation): {}", list.join(", "))?;
            for (dp, r) in Dataplane::ALL.iter().zip(&runs) {
                let list: Vec<String> = r
                    .iter()
                    .map(|x| format!("{:.0} pps ({} of {} sent)", x.pps(), x.delivered, x.sent))
                    .collect();
                writeln!(raw, "- pps, {n} services, {kind}, {}: {}", dp.name(), list.join(", "))?;
            }
            if n == max_lane {
                pps_at_max.push((kind, pps));
            }
        }
    }

    // 3. Short connections.
    writeln!(md, "\n## 3. Short TCP connections through a node\n")?;
    writeln!(
        md,
        "Method: the same lanes with the services on TCP port 80; in the pod, `lb-netcheck http-close` (two \
         threads, a fixed 200 answer, then close); in the client, `wrk -t4 -c64 -d{secs}s --latency` with \
         `Connection: close` (every request a new connection), each thread on its own service at 1/8, 3/8, 5/8 and \
         7/8 of the table (the position matters to iptables, which walks KUBE-SERVICES). The client's sockets \
         leave their checksums to offload, as on any veth. Medians of {rounds} runs, the lanes alternating. \
         *Ceiling*: the same load straight to the pods' addresses through the TC agent's node (no service \
         translation): client, server, the node's forwarding and wrk share the machine's two cores, so this is \
         the most any dataplane can show here. *TC ÷ ceiling*: the agent's share of it, median of the rounds' \
         ratios (the ceiling moves with the machine's speed from one block of runs to the next).\n",
        secs = plan.cps_secs,
        rounds = plan.lane_rounds,
    )?;
    writeln!(
        md,
        "| services | TC conn/s | XDP | iptables | nftables | ceiling | TC ÷ ceiling | TC ÷ ipt | TC ÷ nft | XDP ÷ ipt | XDP ÷ nft | p50 ms tc / xdp / ipt / nft | p99 ms tc / xdp / ipt / nft | softirq µs/conn tc / xdp / ipt / nft | errors |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|")?;
    // Per service count: the medians, and the TC agent's share of the
    // ceiling measured in the same rounds (which moves with the machine).
    let mut cps_by_n: Vec<(u32, [f64; DATAPLANES], f64)> = Vec::new();
    // From the node itself: TC lane's agent (socket hooks), iptables,
    // nftables, ceiling; and the agent's share of the ceiling.
    let mut host_by_n: Vec<(u32, [f64; 4], f64)> = Vec::new();
    let mut host_rows = String::new();
    let mut pod_rows = String::new();
    let mut rule_change: [Vec<Duration>; 2] = Default::default();
    for &n in &plan.lane_services {
        eprintln!("bench: connections per second, {n} services");
        bench::wait_quiet(quiet)?;
        let lanes = Lanes::new(n, Proto::Tcp)?;
        bench::wait_quiet(quiet)?;
        lane_loads.push((Proto::Tcp, n, lanes.load_secs()));
        let mut runs: [Vec<CpsRun>; DATAPLANES] = Default::default();
        let mut ceiling = Vec::new();
        for _ in 0..plan.lane_rounds {
            for (i, r) in runs.iter_mut().enumerate() {
                r.push(lanes.cps(i, plan.cps_secs, false)?);
            }
            ceiling.push(lanes.cps(TC, plan.cps_secs, true)?);
        }
        let pick = |f: fn(&CpsRun) -> f64| runs.each_ref().map(|r| median(r.iter().map(f).collect()));
        let cps = pick(|r| r.cps);
        let p50 = pick(|r| r.p50_ms);
        let p99 = pick(|r| r.p99_ms);
        let soft = pick(|r| r.softirq_secs * 1e6 / r.connections.max(1) as f64);
        let errors: u64 = runs.iter().flatten().map(|r| r.errors).sum();
        let top = median(ceiling.iter().map(|r| r.cps).collect());
        let share = median(runs[TC].iter().zip(&ceiling).map(|(r, c)| r.cps / c.cps).collect());
        let joined = |v: [f64; DATAPLANES], digits: usize| v.map(|x| format!("{x:.digits$}")).join(" / ");
        writeln!(
            md,
            "| {n} | {:.0} | {:.0} | {:.0} | {:.0} | {top:.0} | {share:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {errors} |",
            cps[TC],
            cps[XDP],
            cps[IPT],
            cps[NFT],
            cps[TC] / cps[IPT],
            cps[TC] / cps[NFT],
            cps[XDP] / cps[IPT],
            cps[XDP] / cps[NFT],
            joined(p50, 2),
            joined(p99, 2),
            joined(soft, 1),
        )?;
        for (dp, r) in Dataplane::ALL.iter().zip(&runs) {
            let list: Vec<String> = r.iter().map(|x| format!("{:.0}", x.cps)).collect();
            writeln!(raw, "- conn/s, {n} services, {}: {}", dp.name(), list.join(", "))?;
        }
        let list: Vec<String> = ceiling.iter().map(|x| format!("{:.0}", x.cps)).collect();
        writeln!(raw, "- conn/s, {n} services, ceiling: {}", list.join(", "))?;
        cps_by_n.push((n, cps, share));
        eprintln!("bench: connections per second from the node, {n} services");
        let mut host: [Vec<f64>; 4] = Default::default();
        let mut host_share = Vec::new();
        for _ in 0..plan.lane_rounds {
            let agent = lanes.host_cps(TC, plan.cps_secs, false)?.cps;
            let ipt = lanes.host_cps(IPT, plan.cps_secs, false)?.cps;
            let nft = lanes.host_cps(NFT, plan.cps_secs, false)?.cps;
            let top = lanes.host_cps(TC, plan.cps_secs, true)?.cps;
            host_share.push(agent / top);
            for (v, x) in host.iter_mut().zip([agent, ipt, nft, top]) {
                v.push(x);
            }
        }
        for (name, v) in ["socket hooks", "iptables OUTPUT", "nftables output", "ceiling"].iter().zip(&host) {
            let list: Vec<String> = v.iter().map(|x| format!("{x:.0}")).collect();
            writeln!(raw, "- conn/s from the node, {n} services, {name}: {}", list.join(", "))?;
        }
        let h = host.each_ref().map(|v| median(v.clone()));
        let h_share = median(host_share);
        writeln!(
            host_rows,
            "| {n} | {:.0} | {:.0} | {:.0} | {:.0} | {h_share:.2} | {:.2} | {:.2} |",
            h[0],
            h[1],
            h[2],
            h[3],
            h[0] / h[1],
            h[0] / h[2]
        )?;
        host_by_n.push((n, h, h_share));
        eprintln!("bench: connections per second from a pod, {n} services");
        let mut pod: [Vec<f64>; 3] = Default::default();
        for _ in 0..plan.lane_rounds {
            let runs = [
                lanes.pod_cps(plan.cps_secs, PodPath::PerPacket)?.cps,
                lanes.pod_cps(plan.cps_secs, PodPath::Sockets)?.cps,
                lanes.pod_cps(plan.cps_secs, PodPath::Ceiling)?.cps,
            ];
            for (v, x) in pod.iter_mut().zip(runs) {
                v.push(x);
            }
        }
        for (name, v) in ["per packet", "socket hooks", "ceiling"].iter().zip(&pod) {
            let list: Vec<String> = v.iter().map(|x| format!("{x:.0}")).collect();
            writeln!(raw, "- conn/s from a pod, {n} services, {name}: {}", list.join(", "))?;
        }
        let p = pod.each_ref().map(|v| median(v.clone()));
        writeln!(pod_rows, "| {n} | {:.0} | {:.0} | {:.0} | {:.2} |", p[0], p[1], p[2], p[1] / p[0])?;
        if n == max_lane {
            eprintln!("bench: kube-proxy rule updates, {n} services");
            for round in 0..plan.rule_changes {
                for (k, times) in rule_change.iter_mut().enumerate() {
                    times.push(lanes.rule_change(IPT + k, n / 2, round)?);
                }
            }
        }
    }

    writeln!(md, "\n## 3b. Short TCP connections from the node itself\n")?;
    writeln!(
        md,
        "Method: the same lanes and load (`wrk -t4 -c64 -d{secs}s`, `Connection: close`, four services at 1/8 \
         ... 7/8 of the table), with `wrk` in the node's own namespace, as the kubelet or a hostNetwork pod \
         would connect: on the TC lane inside the agent's cgroup, where its socket hooks translate each \
         connect() (they serve the node's namespace in modes `host` and `all`); on the netfilter lanes through kube-proxy's nat OUTPUT chains. \
         *Ceiling*: the same load from the node straight to the pods' addresses. Medians of {rounds} runs.\n",
        secs = plan.cps_secs,
        rounds = plan.lane_rounds,
    )?;
    writeln!(
        md,
        "| services | socket hooks conn/s | iptables | nftables | ceiling | hooks ÷ ceiling | hooks ÷ ipt | hooks ÷ nft |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    md.push_str(&host_rows);
    writeln!(md, "\n## 3c. Short TCP connections from a pod: socket hooks or per packet\n")?;
    writeln!(
        md,
        "Method: the same load from client pods on the TC lane's node (each on its own veth, served by the pod \
         hook) to the services, the agent running `--socket-lb all`: *per packet* from a pod outside the \
         agent's cgroup (the pod hook translates and tracks every packet, as with `--socket-lb host`), *socket \
         hooks* from a pod inside it (translated once at connect(), no conntrack entry), *ceiling* from that pod \
         straight to the pods' addresses. Two client pods, so that one path's connections never meet the \
         server's TIME_WAIT of the other's (a client's TCP timestamps start from an offset that depends on the \
         address it dialled: a service's or a pod's). Medians of {} runs.\n",
        plan.lane_rounds
    )?;
    writeln!(md, "| services | per packet conn/s | socket hooks | ceiling | hooks ÷ per packet |")?;
    writeln!(md, "|---:|---:|---:|---:|---:|")?;
    md.push_str(&pod_rows);

    // 4. Control plane (the agent's part was measured first, on a quiet machine).
    writeln!(md, "\n## 4. Control plane\n")?;
    writeln!(
        md,
        "Method: the real `lb-agent` (release build) in a namespace, reading {} Services × 10 endpoints from \
         manifests (100 Services per file); start-up is the time from spawning it to its log line that all \
         frontends are synced. Then {} times, one endpoint of one Service (in its own file) is replaced, timed \
         from the file's rename to the new backend in the pinned map (polled every 0.2 ms). Peak RSS is the \
         agent's VmHWM.\n",
        cp.services, cp.changes
    )?;
    writeln!(md, "| services | start to programmed | endpoint change p50 | p99 | agent peak RSS |")?;
    writeln!(md, "|---:|---:|---:|---:|---:|")?;
    writeln!(
        md,
        "| {} | {:.2} s | {:.1} ms | {:.1} ms | {:.1} MiB |\n",
        cp.services,
        cp.startup.as_secs_f64(),
        cp.change_p50.as_secs_f64() * 1000.0,
        cp.change_p99.as_secs_f64() * 1000.0,
        cp.peak_rss_kib as f64 / 1024.0
    )?;
    writeln!(
        md,
        "Beside it, loading the same services into each lane of parts 2 and 3: for the agent, start to all \
         programmed (as above, through the agent's log); for kube-proxy's rule sets, the run time of \
         iptables-restore and `nft -f` on the whole set in one transaction, as kube-proxy's first sync writes it.\n"
    )?;
    writeln!(
        md,
        "| services × 10 endpoints | protocol | lb-agent (TC lane) | lb-agent (XDP lane) | iptables-restore | nft -f |\n|---:|---|---:|---:|---:|---:|"
    )?;
    for (proto, n, t) in &lane_loads {
        let t = t.map(|s| format!("{s:.2} s")).join(" | ");
        writeln!(md, "| {n} | {} | {t} |", proto.name())?;
    }
    let stat = |v: &[Duration]| {
        let ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        let max = ms.iter().copied().fold(0.0, f64::max);
        (median(ms), max)
    };
    let (ipt_change, ipt_change_max) = stat(&rule_change[0]);
    let (nft_change, nft_change_max) = stat(&rule_change[1]);
    writeln!(
        md,
        "\nOne endpoint change at {max_lane} services, as kube-proxy writes it ({} times each): iptables-restore \
         --noflush of its partial sync (the top-level chains in full, the changed KUBE-SVC chain, the new KUBE-SEP \
         chain, the old one deleted): median {ipt_change:.0} ms, max {ipt_change_max:.0} ms; `nft -f` of its \
         transaction (new endpoint chain, service chain flushed and rewritten, old endpoint chain deleted): median \
         {nft_change:.0} ms, max {nft_change_max:.0} ms. These time the command alone, from an already written \
         input; the agent's figure above runs from the manifest's change to the map.\n",
        plan.rule_changes
    )?;

    // Goals, each with what limits it when missed.
    let rss = cp.peak_rss_kib as f64 / 1024.0;
    let p99 = cp.change_p99.as_secs_f64() * 1000.0;
    let startup = cp.startup.as_secs_f64();
    let mut goals: Vec<(String, String, bool, &str)> = vec![
        (
            "established flow at most ~2× the parse-and-TX floor".into(),
            format!("up to {ratio_max:.2}×"),
            ratio_max <= 2.0,
            "per packet the program does a conntrack lookup (UDP flows also check that their backend is still \
             one of the service's endpoints), the per-service \
             counters and the rewrite; the next hop comes from a per-CPU cache of the FIB's answers.",
        ),
        (
            "established flow flat within 10% across service counts".into(),
            format!("{spread:.1}%"),
            spread <= 10.0,
            "larger tables miss the CPU caches more often on the lookups above.",
        ),
    ];
    for (kind, pps) in &pps_at_max {
        let (vs_ipt, vs_nft) = (pps[TC] / pps[IPT], pps[TC] / pps[NFT]);
        let (goal, met) = if flows_per_service(kind) {
            ("≥ 3× iptables and above nftables", vs_ipt >= 3.0 && vs_nft > 1.0)
        } else {
            ("≥ 3× iptables and ≥ 1.5× nftables", vs_ipt >= 3.0 && vs_nft >= 1.5)
        };
        goals.push((
            format!("pps at {max_lane} services, TC path, {goal} ({kind})"),
            format!(
                "{vs_ipt:.2}× iptables, {vs_nft:.2}× nftables (XDP path: {:.2}× / {:.2}×)",
                pps[XDP] / pps[IPT],
                pps[XDP] / pps[NFT]
            ),
            met,
            if flows_per_service(kind) {
                "the TC path redirects each packet into the pod without the node's stack, but the generator's \
                 rate (see *offered* and *ceiling*) is what the fast lanes reach: it offers frames only as fast as \
                 their pages come back, through the node's receive path, the pod's and the sink, which every \
                 lane pays. Against kube-proxy the figure is then a lower bound."
            } else {
                "every packet opens a flow: a backend choice and two conntrack entries in the agent's maps \
                 (kube-proxy's netfilter conntrack does the same work in its own table)."
            },
        ));
    }
    let spread_of = |v: Vec<f64>| {
        let (lo, hi) = v.iter().fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        (hi - lo) / lo * 100.0
    };
    let cps_spread = spread_of(cps_by_n.iter().map(|(_, c, _)| c[TC]).collect());
    let share_spread = spread_of(cps_by_n.iter().map(|(_, _, s)| *s).collect());
    goals.push((
        "conn/s flat within 5% across service counts".into(),
        format!("{cps_spread:.1}% (as a share of the ceiling: {share_spread:.1}%)"),
        cps_spread <= 5.0,
        "the agent's path does not depend on the service count (see the per-packet figures), but client, \
         server and forwarding share two cores, and the machine's speed drifts between blocks of runs: the \
         ceiling, the same load without any translation, moves with it (raw figures below). The agent's \
         share of that ceiling is the steadier figure.",
    ));
    let worst_vs_nft = cps_by_n.iter().map(|(_, c, _)| c[TC] / c[NFT]).fold(f64::MAX, f64::min);
    goals.push((
        "conn/s at least nftables' at every service count".into(),
        format!("lowest {worst_vs_nft:.2}×"),
        worst_vs_nft >= 1.0,
        "see the ceiling column: the load generator and the server take most of the two cores.",
    ));
    if let Some((_, c, _)) = cps_by_n.last() {
        goals.push((
            format!("conn/s ≥ 1.7× iptables at {max_lane} services"),
            format!("{:.2}×", c[TC] / c[IPT]),
            c[TC] / c[IPT] >= 1.7,
            "see the ceiling column: the load generator and the server take most of the two cores.",
        ));
    }
    let host_spread = spread_of(host_by_n.iter().map(|(_, h, _)| h[0]).collect());
    let host_share_spread = spread_of(host_by_n.iter().map(|(_, _, s)| *s).collect());
    goals.push((
        "conn/s from the node flat within 5% across service counts".into(),
        format!("{host_spread:.1}% (as a share of the ceiling: {host_share_spread:.1}%)"),
        host_spread <= 5.0,
        "the hooks' work per connect() is one hash lookup and one choice whatever the table's size; the \
         ceiling moves with the machine between blocks of runs (raw figures below).",
    ));
    let host_worst_vs_nft = host_by_n.iter().map(|(_, h, _)| h[0] / h[2]).fold(f64::MAX, f64::min);
    goals.push((
        "conn/s from the node at least nftables' at every service count".into(),
        format!("lowest {host_worst_vs_nft:.2}×"),
        host_worst_vs_nft >= 1.0,
        "see the ceiling column: wrk and the server take most of the two cores.",
    ));
    goals.push((
        format!("{} services programmed in under 2 s", cp.services),
        format!("{startup:.2} s"),
        startup < 2.0,
        "parsing the YAML manifests dominates start-up.",
    ));
    goals.push((
        "one endpoint change in the maps under 10 ms p99".into(),
        format!("{p99:.1} ms"),
        p99 < 10.0,
        "a change costs the file's event, reading that file again, deriving the changed Service, comparing \
         every frontend with what is programmed, and the map writes \
         (`cargo run --release -p lb-tests --example cp_profile` splits it); the tail comes from the machine's \
         other work, on two cores.",
    ));
    goals.push((
        "agent RSS under 100 MiB".into(),
        format!("{rss:.1} MiB"),
        rss < 100.0,
        "the agent holds every parsed Service and EndpointSlice (k8s-openapi structs, a few KiB per slice of \
         10 endpoints); a compact form of endpoints kept by the sources would shrink it.",
    ));
    writeln!(md, "## Goals\n\n| goal | figure | |\n|---|---|---|")?;
    for (goal, figure, ok, _) in &goals {
        writeln!(md, "| {goal} | {figure} | {} |", if *ok { "met" } else { "**missed**" })?;
    }
    let missed: Vec<_> = goals.iter().filter(|g| !g.2).collect();
    if !missed.is_empty() {
        writeln!(md, "\nWhat limits the missed ones, as far as measured:\n")?;
        for (goal, _, _, limit) in missed {
            writeln!(md, "- *{goal}*: {limit}")?;
        }
    }
    writeln!(md, "\n## Raw figures\n\n{raw}")?;
    writeln!(md, "Total run time: {:.0} s.", started.elapsed().as_secs_f64())?;
    std::fs::write(&output, md)?;
    eprintln!("bench: wrote {}", output.display());
    Ok(())
}

/// Whether a part 2 traffic kind keeps its flows open (as opposed to a new
/// flow per frame).
fn flows_per_service(kind: &str) -> bool {
    kind == ESTABLISHED
}

fn kilo(v: f64) -> String {
    format!("{:.1}k", v / 1000.0)
}

/// The first line of `program flag`, e.g. "iptables v1.8.9 (nf_tables)".
fn tool_version(program: &str, flag: &str) -> String {
    std::process::Command::new(program)
        .arg(flag)
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_owned))
        .unwrap_or_else(|| format!("{program}: version unknown"))
}
