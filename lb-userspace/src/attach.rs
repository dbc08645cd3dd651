//! Attaching the programs: the north-south program on the external
//! interfaces (TC ingress by default, XDP where it is an acceleration),
//! TCX ingress on pod interfaces, the socket hooks on a cgroup v2
//! directory (the host's root by default). Every attachment is a BPF link pinned
//! under `<pin dir>/links/`, so it outlives the agent: an ordinary stop or a
//! crash leaves traffic flowing, and the next run swaps its own program
//! into the same link atomically. Only `lb-agent reset` detaches.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};
use tracing::{debug, info, warn};

use crate::loader::{SOCK_PROGRAMS, TC_EGRESS_PROGRAM, TC_EXT_PROGRAM, TC_POD_PROGRAM, XDP_PROGRAM};

pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

pub fn link_pin(pin_dir: &Path, program: &str, ifname: &str) -> PathBuf {
    links_dir(pin_dir).join(format!("{program}@{ifname}"))
}

/// Loads the programs into the kernel (verification happens here).
pub fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    let xdp: &mut Xdp = ebpf.program_mut(XDP_PROGRAM).context("no XDP program")?.try_into()?;
    xdp.load().context("loading the XDP program")?;
    for name in [TC_EXT_PROGRAM, TC_POD_PROGRAM, TC_EGRESS_PROGRAM] {
        let tc: &mut SchedClassifier = ebpf.program_mut(name).context("no TC program")?.try_into()?;
        tc.load().with_context(|| format!("loading {name}"))?;
    }
    for name in SOCK_PROGRAMS {
        let sock: &mut CgroupSockAddr = ebpf.program_mut(name).context("no socket program")?.try_into()?;
        sock.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(())
}

/// The pin of socket program `program`'s link on the cgroup with id
/// `cgroup_id` (its directory's inode).
fn cgroup_link_pin(pin_dir: &Path, program: &str, cgroup_id: u64) -> PathBuf {
    links_dir(pin_dir).join(format!("{program}@cgroup-{cgroup_id}"))
}

/// Attaches (or re-attaches) the socket hooks to the cgroup v2 directory
/// `cgroup`, then removes those an earlier run left on another cgroup.
pub fn attach_sockets(ebpf: &mut Ebpf, pin_dir: &Path, cgroup: &Path) -> Result<()> {
    let id = crate::socket_lb::cgroup_id(cgroup)?;
    let dir = cgroup.to_string_lossy().into_owned();
    for name in SOCK_PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf.program_mut(name).context("no socket program")?.try_into()?;
        pinned_link(
            prog,
            &cgroup_link_pin(pin_dir, name, id),
            &dir,
            |prog, old| Ok(prog.attach_to_link(old.try_into()?).map(drop)?),
            |prog, dir| {
                let cgroup =
                    fs::File::open(dir.to_str()?).with_context(|| format!("opening cgroup {dir:?}"))?;
                // A link is always one of many on its cgroup (flags 0).
                let id = prog.attach(&cgroup, CgroupAttachMode::Single)?;
                Ok(prog.take_link(id)?.try_into()?)
            },
        )?;
    }
    detach_sockets(pin_dir, Some(id))
}

/// Removes the socket hooks' links (`--socket-lb off`), or those on
/// cgroups other than `keep`.
pub fn detach_sockets(pin_dir: &Path, keep: Option<u64>) -> Result<()> {
    let Ok(entries) = fs::read_dir(links_dir(pin_dir)) else { return Ok(()) };
    let kept = keep.map(|id| format!("@cgroup-{id}"));
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = SOCK_PROGRAMS.iter().any(|p| name.starts_with(&format!("{p}@cgroup-")));
        if ours && kept.as_ref().is_none_or(|k| !name.ends_with(k.as_str())) {
            fs::remove_file(entry.path()).with_context(|| format!("detaching {name}"))?;
            info!(link = %name, "detached");
        }
    }
    Ok(())
}

/// Lets the stack accept packets whose source is one of this node's
/// addresses on `ifname`. The programs produce such packets where they hand
/// translated packets to the stack: SNATed flows XDP passes on (next hop
/// not yet resolved), and local backends' replies to a NodePort when
/// forwarding goes through the stack (XDP, `--forwarding stack`).
fn accept_local(procfs: &Path, ifname: &str) -> Result<()> {
    let sysctl = procfs.join(format!("sys/net/ipv4/conf/{ifname}/accept_local"));
    fs::write(&sysctl, "1").with_context(|| format!("setting {}", sysctl.display()))
}

/// Which hook runs the north-south program on external interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acceleration {
    /// XDP where the interface is a NIC whose driver runs XDP natively,
    /// else TC.
    Auto,
    Xdp,
    Tc,
}

/// The hook an external interface got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    pub fn program(self) -> &'static str {
        match self {
            Hook::Xdp => XDP_PROGRAM,
            Hook::Tc => TC_EXT_PROGRAM,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        }
    }
}

/// What an external interface got, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct External {
    pub interface: String,
    pub hook: Hook,
    pub reason: String,
}

impl fmt::Display for External {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.interface, self.hook.name(), self.reason)
    }
}

/// The driver of `ifname`'s device, from sysfs; `None` for an interface
/// without a device (veth, bridge, bond, tunnel...).
fn device_driver(ifname: &str) -> Option<String> {
    let link = fs::read_link(format!("/sys/class/net/{ifname}/device/driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Attaches the north-south program to `ifname` as `accel` asks, then
/// removes the other hook's link, if an earlier run left one: attached in
/// that order, both hooks share the conntrack table and established flows
/// carry on through the switch. The egress program goes on either way.
pub fn attach_external(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    procfs: &Path,
    ifname: &str,
    accel: Acceleration,
) -> Result<External> {
    accept_local(procfs, ifname)?;
    attach_tc(ebpf, pin_dir, TC_EGRESS_PROGRAM, ifname, TcAttachType::Egress)?;
    let (hook, reason) = match accel {
        Acceleration::Tc => {
            attach_tc(ebpf, pin_dir, TC_EXT_PROGRAM, ifname, TcAttachType::Ingress)?;
            (Hook::Tc, "forced by --acceleration tc".to_string())
        }
        Acceleration::Xdp => {
            attach_xdp(ebpf, pin_dir, ifname, XdpMode::Default)?;
            (Hook::Xdp, "forced by --acceleration xdp".to_string())
        }
        Acceleration::Auto => match device_driver(ifname) {
            None => {
                attach_tc(ebpf, pin_dir, TC_EXT_PROGRAM, ifname, TcAttachType::Ingress)?;
                let reason = "a virtual interface: local senders leave checksums partial, which XDP cannot see, \
                              and XDP_TX into a veth is lost unless its peer runs XDP";
                (Hook::Tc, reason.to_string())
            }
            Some(driver) => match attach_xdp(ebpf, pin_dir, ifname, XdpMode::Driver) {
                Ok(()) => (Hook::Xdp, format!("native XDP in driver {driver}")),
                Err(e) => {
                    attach_tc(ebpf, pin_dir, TC_EXT_PROGRAM, ifname, TcAttachType::Ingress)?;
                    (Hook::Tc, format!("driver {driver} does not run XDP natively here: {e:#}"))
                }
            },
        },
    };
    let other = if hook == Hook::Xdp { Hook::Tc } else { Hook::Xdp };
    let stale = link_pin(pin_dir, other.program(), ifname);
    if stale.exists() {
        fs::remove_file(&stale).with_context(|| format!("detaching {}", stale.display()))?;
        info!(interface = ifname, from = other.name(), to = hook.name(), "switched the north-south hook");
    }
    Ok(External { interface: ifname.to_string(), hook, reason })
}

fn attach_xdp(ebpf: &mut Ebpf, pin_dir: &Path, ifname: &str, mode: XdpMode) -> Result<()> {
    let prog: &mut Xdp = ebpf.program_mut(XDP_PROGRAM).context("no XDP program")?.try_into()?;
    pinned_link(
        prog,
        &link_pin(pin_dir, XDP_PROGRAM, ifname),
        ifname,
        |prog, old| Ok(prog.attach_to_link(old.try_into()?).map(drop)?),
        |prog, name| {
            let id = prog.attach(name, mode)?;
            Ok(prog.take_link(id)?.try_into()?)
        },
    )
}

/// Attaches (or re-attaches) the pod program at ingress of `ifname`, and
/// the egress program.
pub fn attach_pod(ebpf: &mut Ebpf, pin_dir: &Path, procfs: &Path, ifname: &str) -> Result<()> {
    accept_local(procfs, ifname)?;
    attach_tc(ebpf, pin_dir, TC_POD_PROGRAM, ifname, TcAttachType::Ingress)?;
    attach_tc(ebpf, pin_dir, TC_EGRESS_PROGRAM, ifname, TcAttachType::Egress)
}

/// Attaches (or re-attaches) TC program `program` on `ifname`.
fn attach_tc(ebpf: &mut Ebpf, pin_dir: &Path, program: &str, ifname: &str, at: TcAttachType) -> Result<()> {
    let prog: &mut SchedClassifier = ebpf.program_mut(program).context("no TC program")?.try_into()?;
    pinned_link(
        prog,
        &link_pin(pin_dir, program, ifname),
        ifname,
        |prog, old| Ok(prog.attach_to_link(old.try_into()?).map(drop)?),
        |prog, name| {
            let id = prog.attach(name, at)?;
            Ok(prog.take_link(id)?.try_into()?)
        },
    )
}

/// Swaps the program into the link pinned at `pin` (an earlier run's), or
/// attaches anew and pins the link.
/// `target` names the interface or the cgroup directory.
fn pinned_link<P>(
    prog: &mut P,
    pin: &Path,
    target: &str,
    replace: impl FnOnce(&mut P, FdLink) -> Result<()>,
    attach: impl FnOnce(&mut P, &std::ffi::CStr) -> Result<FdLink>,
) -> Result<()> {
    let name = pin.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Ok(old) = PinnedLink::from_pin(pin) {
        match replace(prog, FdLink::from(old)) {
            Ok(()) => {
                debug!(link = %name, "program replaced in the pinned link");
                return Ok(());
            }
            Err(e) => {
                warn!(link = %name, error = %e, "pinned link is stale: attaching anew");
                let _ = fs::remove_file(pin);
            }
        }
    }
    let cname = std::ffi::CString::new(target)?;
    let link = attach(prog, cname.as_c_str()).with_context(|| format!("attaching {name}"))?;
    fs::create_dir_all(pin.parent().expect("links dir"))?;
    link.pin(pin).with_context(|| format!("pinning {}", pin.display()))?;
    info!(link = %name, "attached");
    Ok(())
}

/// The interfaces of this network namespace: name → ifindex.
pub fn interfaces() -> Result<BTreeMap<String, u32>> {
    let list = nix::net::if_::if_nameindex().context("listing interfaces")?;
    Ok(list.iter().map(|i| (i.name().to_string_lossy().into_owned(), i.index())).collect())
}

/// Pod interfaces: those matching any of `patterns` (shell globs).
pub fn matching(all: &BTreeMap<String, u32>, patterns: &[glob::Pattern]) -> BTreeMap<String, u32> {
    all.iter().filter(|(n, _)| patterns.iter().any(|p| p.matches(n))).map(|(n, i)| (n.clone(), *i)).collect()
}

/// Removes the pins of the pod links on `ifname`: the interface is gone
/// (the kernel already detached them), or it is a new interface under an
/// old name.
pub fn forget_pod(pin_dir: &Path, ifname: &str) {
    for program in [TC_POD_PROGRAM, TC_EGRESS_PROGRAM] {
        if fs::remove_file(link_pin(pin_dir, program, ifname)).is_ok() {
            debug!(interface = ifname, program, "forgot the TC link of a gone interface");
        }
    }
}

/// Removes pins of pod links whose interface is gone.
pub fn forget_gone(pin_dir: &Path, present: &BTreeMap<String, u32>) {
    let Ok(entries) = fs::read_dir(links_dir(pin_dir)) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ifname = [TC_POD_PROGRAM, TC_EGRESS_PROGRAM]
            .iter()
            .find_map(|program| name.strip_prefix(&format!("{program}@")));
        if let Some(ifname) = ifname
            && !present.contains_key(ifname)
        {
            forget_pod(pin_dir, ifname);
        }
    }
}

/// Detaches everything and removes all pins (`lb-agent reset`).
pub fn reset(pin_dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    if let Ok(entries) = fs::read_dir(links_dir(pin_dir)) {
        for entry in entries.flatten() {
            // The link goes away with its last reference: the pin.
            fs::remove_file(entry.path()).with_context(|| format!("unpinning {}", entry.path().display()))?;
            removed.push(format!("link {}", entry.file_name().to_string_lossy()));
        }
        let _ = fs::remove_dir(links_dir(pin_dir));
    }
    // The registry's maps, and those of other versions (renamed or
    // retired maps): every `lb_*` pin here is ours.
    let mut pins: BTreeSet<String> =
        lb_common::registry::MAPS.iter().filter(|m| m.pinned).map(|m| m.name.to_string()).collect();
    if let Ok(entries) = fs::read_dir(pin_dir) {
        pins.extend(
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("lb_")),
        );
    }
    for name in pins {
        let p = pin_dir.join(&name);
        if p.exists() {
            fs::remove_file(&p).with_context(|| format!("unpinning {}", p.display()))?;
            removed.push(format!("map {name}"));
        }
    }
    Ok(removed)
}

/// Blocks, calling `on_change` whenever the kernel reports a link
/// (interface) or IPv4 address change in this namespace. Runs on its own
/// thread.
pub fn watch_links(mut on_change: impl FnMut() -> bool) -> Result<()> {
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
    let mut socket = Socket::new(NETLINK_ROUTE).context("netlink socket")?;
    let groups = libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR;
    socket.bind(&SocketAddr::new(0, groups as u32)).context("subscribing to link and address events")?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // The message says which link changed; a rescan is simpler and
        // catches anything a lost message would have.
        socket.recv(&mut &mut buf[..], 0).context("reading netlink")?;
        if !on_change() {
            return Ok(());
        }
    }
}
