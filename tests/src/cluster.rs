//! A small cluster in network namespaces, for the scenario tests and the demo.
//!
//! ```text
//!  client (192.0.2.100) ─┐
//!  node-1 (192.0.2.11) ──┼── switch (bridge)        all on 192.0.2.0/24
//!  node-2 (192.0.2.12) ──┘
//!  node-1 ── lbp-* veths ── pods 10.244.1.0/24      node-2 ── pods 10.244.2.0/24
//! ```
//!
//! Every interface and address lives in namespaces made here, named with a
//! per-run prefix; nothing routes out of the topology. Each node runs the
//! real `lb-agent` from a manifests folder, as a DaemonSet would, on its
//! `eth0` and its pod interfaces. Pods run `lb-netcheck serve`. Dropping
//! the cluster stops everything and removes the namespaces and the bpffs
//! mount, also when a test fails.
//!
//! The default topology is what plain Linux gives (kind, containerlab, a
//! VM bridge): a bridge as the switch, veths with the kernel's default
//! offloads, nothing attached on the switch side, and a default route on
//! each node toward an address nobody answers. The agents choose their
//! hooks themselves (`--acceleration auto`: TC on a veth). `Topology::NicLike`
//! models NICs instead, to carry XDP: senders complete their checksums
//! (`tx off`), the switch ports run an XDP program (so XDP_TX frames are
//! delivered to them), and the agents are told `--acceleration xdp`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::netns::{Agent, Bpffs, Cgroup, HostProcess, Netns, Place, run, unique, veth, wait_for};

/// The demo's and the scenarios' pods.
pub fn standard_pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("web-a", 0, "10.244.1.10"),
        PodSpec::new("web-b", 0, "10.244.1.11"),
        PodSpec::new("web-c", 1, "10.244.2.10"),
        PodSpec::new("legacy-x", 1, "10.244.2.20"),
        PodSpec::new("client-pod", 0, "10.244.1.50"),
    ]
}

pub const CLIENT_ADDR: &str = "192.0.2.100";
pub const NODE_ADDRS: [&str; 2] = ["192.0.2.11", "192.0.2.12"];
pub const NODE_NAMES: [&str; 2] = ["node-1", "node-2"];
/// Routed by the client to node-1: LoadBalancer (TEST-NET-2) and external
/// IPs (TEST-NET-3), as an upstream router would.
pub const VIP_RANGES: [&str; 2] = ["198.51.100.0/24", "203.0.113.0/24"];

/// Nobody has this address: the nodes' default route points at it.
pub const NOWHERE: &str = "192.0.2.254";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// The untuned model of a real network (the default).
    Plain,
    /// NIC-like links, for the XDP path.
    NicLike,
}

#[derive(Clone, Copy)]
enum Plug {
    Client,
    Client2,
    Node(usize),
}

/// MAC of every pod's gateway (the host side of its veth).
const GATEWAY_MAC: &str = "ee:ee:ee:ee:ee:ee";

/// A pod: its name (also what its servers answer), node (0 or 1) and address.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub node: usize,
    pub addr: String,
}

impl PodSpec {
    pub fn new(name: &str, node: usize, addr: &str) -> Self {
        Self { name: name.into(), node, addr: addr.into() }
    }
}

pub struct Pod {
    pub spec: PodSpec,
    pub ns: Netns,
    server: Option<Child>,
}

pub struct Cluster {
    // Drop order matters: agents and servers stop before their namespaces go.
    pub agents: Vec<Option<Agent>>,
    pub pods: Vec<Pod>,
    /// Each node's cgroup: its agent and "host" processes run in it, and
    /// the agent's socket hooks attach to it.
    pub cgroups: Vec<Cgroup>,
    pub client: Netns,
    /// Another external client, for affinity checks.
    pub client2: Netns,
    pub nodes: Vec<Netns>,
    pub switch: Netns,
    pub manifests: PathBuf,
    pub bpffs: Bpffs,
    pub topology: Topology,
    /// NIC-like: XDP_PASS on the switch ports, so frames the nodes send
    /// with XDP_TX are delivered (a veth drops them unless its peer runs
    /// XDP or GRO, and GRO would merge forwarded segments into oversized
    /// frames).
    floor: aya::Ebpf,
    switch_ports: Vec<String>,
    pod_seq: usize,
}

fn helper() -> PathBuf {
    crate::netns::agent_binary().with_file_name("lb-netcheck")
}

fn ethtool(ns: &Netns, args: &[&str]) -> Result<()> {
    run(ns.cmd("ethtool").args(args).stdout(Stdio::null())).map(|_| ())
}

impl Cluster {
    /// Builds the default topology, starts `pods`' servers and an agent per
    /// node reading `manifests` (copied to a folder tests may edit).
    pub fn new(manifests: &Path, pods: &[PodSpec]) -> Result<Self> {
        Self::with_topology(manifests, pods, Topology::Plain)
    }

    pub fn with_topology(manifests: &Path, pods: &[PodSpec], topology: Topology) -> Result<Self> {
        crate::require_root();
        crate::netns::cleanup_on_interrupt();
        let switch = Netns::new("sw")?;
        switch.ip(&["link", "add", "name", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let mut cluster = Self {
            agents: Vec::new(),
            pods: Vec::new(),
            cgroups: vec![Cgroup::new("cg")?, Cgroup::new("cg")?],
            client: Netns::new("c")?,
            client2: Netns::new("c")?,
            nodes: vec![Netns::new("n")?, Netns::new("n")?],
            switch,
            manifests: std::env::temp_dir().join(unique("man")),
            bpffs: Bpffs::new()?,
            topology,
            floor: aya::Ebpf::load(lb_userspace::loader::FLOOR_OBJECT)?,
            switch_ports: Vec::new(),
            pod_seq: 0,
        };
        std::fs::create_dir_all(&cluster.manifests)?;
        for entry in
            std::fs::read_dir(manifests).with_context(|| format!("reading {}", manifests.display()))?
        {
            let p = entry?.path();
            if p.is_file() {
                std::fs::copy(&p, cluster.manifests.join(p.file_name().expect("file name")))?;
            }
        }
        cluster.wire_lan()?;
        for p in pods {
            cluster.add_pod(p.clone())?;
        }
        for i in 0..2 {
            let agent = cluster.start_agent(i)?;
            cluster.agents.push(Some(agent));
        }
        cluster.wait_synced()?;
        Ok(cluster)
    }

    /// Plugs `ns`'s `eth0` into the switch with `addr`.
    fn plug(&mut self, ns_index: Plug, tag: &str, addr: &str) -> Result<()> {
        let port = unique(tag);
        let ns = match ns_index {
            Plug::Client => &self.client,
            Plug::Client2 => &self.client2,
            Plug::Node(i) => &self.nodes[i],
        };
        veth(&self.switch, &port, ns, "eth0")?;
        self.switch.ip(&["link", "set", &port, "master", "br0"])?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        if self.topology == Topology::NicLike {
            // Frames leave with complete checksums, as from a NIC.
            ethtool(ns, &["-K", "eth0", "tx", "off"])?;
        }
        self.switch_ports.push(port);
        Ok(())
    }

    fn attach_switch_floor(&mut self) -> Result<()> {
        let prog: &mut aya::programs::Xdp =
            self.floor.program_mut("floor_pass").context("floor_pass")?.try_into()?;
        prog.load()?;
        let ports = self.switch_ports.clone();
        self.switch.enter(|| -> Result<()> {
            for port in &ports {
                let name = std::ffi::CString::new(port.as_str())?;
                prog.attach(name.as_c_str(), aya::programs::XdpMode::Default)
                    .with_context(|| format!("XDP pass on switch port {port}"))?;
            }
            Ok(())
        })?
    }

    fn wire_lan(&mut self) -> Result<()> {
        self.plug(Plug::Client, "pc", CLIENT_ADDR)?;
        self.plug(Plug::Client2, "pd", "192.0.2.101")?;
        for vips in VIP_RANGES {
            self.client.ip(&["route", "add", vips, "via", NODE_ADDRS[0]])?;
            self.client2.ip(&["route", "add", vips, "via", NODE_ADDRS[0]])?;
        }
        for (i, addr) in NODE_ADDRS.iter().enumerate() {
            self.plug(Plug::Node(i), "pn", addr)?;
            let node = &self.nodes[i];
            node.sysctl("net.ipv4.ip_forward", "1")?;
            node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
            let other = 1 - i;
            node.ip(&["route", "add", &format!("10.244.{}.0/24", other + 1), "via", NODE_ADDRS[other]])?;
            node.ip(&["route", "add", "default", "via", NOWHERE])?;
        }
        if self.topology == Topology::NicLike {
            self.attach_switch_floor()?;
        }
        Ok(())
    }

    /// Adds a pod (namespace, veth `lbp-*` to its node, routes) and starts
    /// its servers. Works while the agents run: they attach to new pods.
    pub fn add_pod(&mut self, spec: PodSpec) -> Result<()> {
        let ns = Netns::new("p")?;
        self.pod_seq += 1;
        let host_if = format!("lbp-{}", self.pod_seq);
        let node = &self.nodes[spec.node];
        veth(node, &host_if, &ns, "eth0")?;
        // Calico-style: a /32 per pod behind a link-local gateway whose
        // address resolves to the host side's fixed MAC.
        node.ip(&["link", "set", &host_if, "address", GATEWAY_MAC])?;
        run(node.cmd("sysctl").args(["-qw", &format!("net.ipv4.conf.{host_if}.rp_filter=0")]))?;
        node.ip(&["route", "add", &format!("{}/32", spec.addr), "dev", &host_if])?;
        ns.ip(&["addr", "add", &format!("{}/32", spec.addr), "dev", "eth0"])?;
        ns.ip(&["route", "add", "169.254.1.1", "dev", "eth0"])?;
        ns.ip(&["neigh", "add", "169.254.1.1", "lladdr", GATEWAY_MAC, "dev", "eth0", "nud", "permanent"])?;
        ns.ip(&["route", "add", "default", "via", "169.254.1.1", "dev", "eth0"])?;
        let server = ns
            .cmd(helper())
            .args(["serve", &spec.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the pod's servers")?;
        let pod = Pod { spec, ns, server: Some(server) };
        // Wait for the servers to listen.
        let listening = wait_for(Duration::from_secs(5), || {
            let out = run(pod.ns.cmd("ss").args(["-ltn"])).ok()?;
            (out.contains(":8080") && out.contains(":7000")).then_some(())
        });
        if listening.is_none() {
            bail!("servers of pod {} did not start", pod.spec.name);
        }
        self.pods.push(pod);
        Ok(())
    }

    pub fn pin_dir(&self, node: usize) -> PathBuf {
        self.bpffs.dir.join(NODE_NAMES[node])
    }

    pub fn start_agent(&self, node: usize) -> Result<Agent> {
        let acceleration = match self.topology {
            Topology::Plain => "auto",
            Topology::NicLike => "xdp",
        };
        self.start_agent_with(node, acceleration)
    }

    /// Starts node `node`'s agent with `--acceleration acceleration`.
    pub fn start_agent_with(&self, node: usize, acceleration: &str) -> Result<Agent> {
        self.start_agent_args(node, &["--acceleration", acceleration])
    }

    /// Starts node `node`'s agent as a DaemonSet would (in the node's
    /// cgroup, its socket hooks on it), with `extra` arguments.
    pub fn start_agent_args(&self, node: usize, extra: &[&str]) -> Result<Agent> {
        let pin = self.pin_dir(node);
        let manifests = self.manifests.to_string_lossy().into_owned();
        let pin = pin.to_string_lossy().into_owned();
        let cgroup = self.cgroups[node].dir.to_string_lossy().into_owned();
        let mut args = vec![
            "run",
            "--manifests",
            &manifests,
            "--node-name",
            NODE_NAMES[node],
            "--external-interface",
            "eth0",
            "--pod-interfaces",
            "lbp-*",
            "--pin-dir",
            &pin,
            "--cgroup-root",
            &cgroup,
        ];
        args.extend_from_slice(extra);
        Agent::start_in(&self.nodes[node], &args, Some(&self.cgroups[node]))
    }

    /// Node `node`'s own processes (host network, the node's cgroup).
    pub fn host(&self, node: usize) -> HostProcess<'_> {
        HostProcess { ns: &self.nodes[node], cgroup: &self.cgroups[node] }
    }

    /// Waits until both agents have synced since they (re)started.
    pub fn wait_synced(&self) -> Result<()> {
        for (i, agent) in self.agents.iter().enumerate() {
            let Some(agent) = agent else { continue };
            if wait_for(Duration::from_secs(15), || agent.log().contains("synced").then_some(())).is_none() {
                bail!("agent on {} did not sync:\n{}", NODE_NAMES[i], agent.log());
            }
        }
        Ok(())
    }

    /// Writes (or replaces) a manifest file in the agents' folder.
    pub fn write_manifest(&self, name: &str, yaml: &str) -> Result<()> {
        let tmp = self.manifests.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.manifests.join(name))?;
        Ok(())
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.spec.name == name).expect("pod exists")
    }

    /// `count` HTTP requests from `ns`, each on a new connection; the answer
    /// of each (a pod name), or `error <curl exit code>` (7: refused, 28:
    /// timed out).
    pub fn http(ns: &impl Place, url: &str, count: usize) -> Result<Vec<String>> {
        let mut out = Vec::with_capacity(count);
        // One curl for many requests; `Connection: close` makes each a new
        // TCP connection from a new source port. Each transfer ends with
        // `|<exit code>`.
        let mut left = count;
        while left > 0 {
            let n = left.min(50);
            let urls = vec![url; n];
            let output = ns
                .cmd("curl")
                .args(["-s", "-m", "3", "-H", "Connection: close", "-w", "|%{exitcode}\n"])
                .args(&urls)
                .output()?;
            let text = String::from_utf8_lossy(&output.stdout);
            for line in text.lines().filter(|l| l.contains('|')) {
                let (body, code) = line.rsplit_once('|').expect("filtered");
                out.push(if code == "0" { body.to_string() } else { format!("error {code}") });
            }
            left -= n;
        }
        anyhow::ensure!(out.len() == count, "curl reported {} of {count} transfers", out.len());
        Ok(out)
    }

    /// One HTTP request; `Err` carries curl's exit code (7: refused, 28: timeout).
    pub fn http_once(ns: &impl Place, url: &str, timeout_s: u32) -> Result<String, i32> {
        Self::curl_once(ns, url, &timeout_s.to_string())
    }

    /// `http_once` giving up after 0.3 s: for polling until a change
    /// answers, so that a probe sent before the agent applied it does not
    /// hold the poll up. (A probe that times out is no proof that something
    /// stopped: poll for that with `http_once`.)
    pub fn http_probe(ns: &impl Place, url: &str) -> Result<String, i32> {
        Self::curl_once(ns, url, "0.3")
    }

    fn curl_once(ns: &impl Place, url: &str, timeout_s: &str) -> Result<String, i32> {
        let output = ns.cmd("curl").args(["-s", "-m", timeout_s, url]).output().map_err(|_| -1)?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(output.status.code().unwrap_or(-1))
        }
    }

    pub fn udp(ns: &impl Place, to: &str, count: usize) -> Result<Vec<String>> {
        Self::netcheck(ns, &["udp", to, &count.to_string()])
    }

    /// `lb-netcheck args` at `place`: its output lines.
    pub fn netcheck(place: &impl Place, args: &[&str]) -> Result<Vec<String>> {
        let out = run(place.cmd(helper()).args(args))?;
        Ok(out.lines().map(str::to_owned).collect())
    }

    /// Starts `lb-netcheck args` at `place`, its output piped.
    pub fn netcheck_spawn(place: &impl Place, args: &[&str]) -> Result<Child> {
        Ok(place.cmd(helper()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?)
    }

    /// Starts a long-lived echo stream from `ns` to `to` for `seconds`.
    pub fn stream(ns: &Netns, to: &str, seconds: u32) -> Result<Child> {
        Ok(ns
            .cmd(helper())
            .args(["stream", to, &seconds.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    }

    pub fn agent_log(&self, node: usize) -> String {
        self.agents[node].as_ref().map(Agent::log).unwrap_or_default()
    }

    /// `lb-agent inspect WHAT -o json` of node `node`'s pins, as an
    /// operator reads them.
    pub fn inspect(&self, node: usize, what: &str) -> Result<serde_json::Value> {
        let out = std::process::Command::new(crate::netns::agent_binary())
            .args(["inspect", what, "-o", "json", "--pin-dir"])
            .arg(self.pin_dir(node))
            .output()?;
        anyhow::ensure!(out.status.success(), "inspect {what}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

/// A one-port Service `name` (`protocol`, `port` → `target`) at
/// `cluster_ip`, with `extra` spec lines (indented two spaces), and one
/// EndpointSlice of ready `(address, node)` endpoints: the manifests the
/// scenarios write while the agents run.
pub fn one_port_service(
    name: &str,
    cluster_ip: &str,
    (protocol, port, target): (&str, u16, u16),
    extra: &str,
    endpoints: &[(&str, &str)],
) -> String {
    let endpoints: String =
        endpoints.iter().map(|(a, n)| format!("  - addresses: [\"{a}\"]\n    nodeName: {n}\n")).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {cluster_ip}\n\
         {extra}  ports:\n    - port: {port}\n      protocol: {protocol}\n      targetPort: {target}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  \
         labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n  - port: {target}\n    \
         protocol: {protocol}\nendpoints:\n{endpoints}"
    )
}

/// Asks `url` from `from` (6 requests a round, for up to 5 s) until
/// `check` holds for a round's answers; `Err` with the last ones if never.
pub fn http_until(
    from: &impl Place,
    url: &str,
    what: &str,
    check: impl Fn(&[String]) -> bool,
) -> Result<Vec<String>> {
    let mut last = Vec::new();
    let ok = wait_for(Duration::from_secs(5), || {
        last = Cluster::http(from, url, 6).ok()?;
        check(&last).then_some(())
    });
    match ok {
        Some(()) => Ok(last),
        None => bail!("{what}: {:?}", tally(&last)),
    }
}

/// How many answers each pod gave.
pub fn tally(answers: &[String]) -> std::collections::BTreeMap<String, usize> {
    let mut t = std::collections::BTreeMap::new();
    for a in answers {
        *t.entry(a.clone()).or_insert(0) += 1;
    }
    t
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents stop first (their pins go with the bpffs mount), then the
        // pods' servers, then the namespaces (fields drop in order).
        self.agents.clear();
        self.pods.clear();
        self.cgroups.clear();
        let _ = std::fs::remove_dir_all(&self.manifests);
    }
}
