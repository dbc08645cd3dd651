//! Attaching the programs: XDP on the external interfaces, TCX ingress on
//! pod interfaces. Every attachment is a BPF link pinned under
//! `<pin dir>/links/`, so it outlives the agent: an ordinary stop or a crash
//! leaves traffic flowing, and the next run swaps its own program into the
//! same link atomically. Only `lb-agent reset` detaches.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};
use tracing::{debug, info, warn};

use crate::loader::{TC_PROGRAM, XDP_PROGRAM};

pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

pub fn link_pin(pin_dir: &Path, program: &str, ifname: &str) -> PathBuf {
    links_dir(pin_dir).join(format!("{program}@{ifname}"))
}

/// Loads both programs into the kernel (verification happens here).
pub fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    let xdp: &mut Xdp = ebpf.program_mut(XDP_PROGRAM).context("no XDP program")?.try_into()?;
    xdp.load().context("loading the XDP program")?;
    let tc: &mut SchedClassifier = ebpf.program_mut(TC_PROGRAM).context("no TC program")?.try_into()?;
    tc.load().context("loading the TC program")?;
    Ok(())
}

/// Lets the stack accept packets whose source is one of this node's
/// addresses on `ifname`. The programs produce such packets: SNATed flows
/// that XDP hands to the stack (next hop not yet resolved), and local
/// backends' replies to a NodePort, rewritten at TC before routing.
fn accept_local(procfs: &Path, ifname: &str) -> Result<()> {
    let sysctl = procfs.join(format!("sys/net/ipv4/conf/{ifname}/accept_local"));
    fs::write(&sysctl, "1").with_context(|| format!("setting {}", sysctl.display()))
}

/// Attaches (or re-attaches) the XDP program to `ifname`.
pub fn attach_xdp(ebpf: &mut Ebpf, pin_dir: &Path, procfs: &Path, ifname: &str) -> Result<()> {
    accept_local(procfs, ifname)?;
    let prog: &mut Xdp = ebpf.program_mut(XDP_PROGRAM).context("no XDP program")?.try_into()?;
    pinned_link(
        prog,
        &link_pin(pin_dir, XDP_PROGRAM, ifname),
        ifname,
        |prog, old| Ok(prog.attach_to_link(old.try_into()?).map(drop)?),
        |prog, name| {
            let id = prog.attach(name, XdpMode::Default)?;
            Ok(prog.take_link(id)?.try_into()?)
        },
    )
}

/// Attaches (or re-attaches) the TC program at ingress of `ifname`.
pub fn attach_tc(ebpf: &mut Ebpf, pin_dir: &Path, procfs: &Path, ifname: &str) -> Result<()> {
    accept_local(procfs, ifname)?;
    let prog: &mut SchedClassifier = ebpf.program_mut(TC_PROGRAM).context("no TC program")?.try_into()?;
    pinned_link(
        prog,
        &link_pin(pin_dir, TC_PROGRAM, ifname),
        ifname,
        |prog, old| Ok(prog.attach_to_link(old.try_into()?).map(drop)?),
        |prog, name| {
            let id = prog.attach(name, TcAttachType::Ingress)?;
            Ok(prog.take_link(id)?.try_into()?)
        },
    )
}

/// Swaps the program into the link pinned at `pin` (an earlier run's), or
/// attaches anew and pins the link.
fn pinned_link<P>(
    prog: &mut P,
    pin: &Path,
    ifname: &str,
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
    let cname = std::ffi::CString::new(ifname)?;
    let link = attach(prog, cname.as_c_str()).with_context(|| format!("attaching {name}"))?;
    fs::create_dir_all(pin.parent().expect("links dir"))?;
    link.pin(pin).with_context(|| format!("pinning {}", pin.display()))?;
    info!(link = %name, "attached");
    Ok(())
}

/// The interfaces of this network namespace.
pub fn interfaces() -> Result<BTreeSet<String>> {
    let list = nix::net::if_::if_nameindex().context("listing interfaces")?;
    Ok(list.iter().map(|i| i.name().to_string_lossy().into_owned()).collect())
}

/// Pod interfaces: those matching any of `patterns` (shell globs).
pub fn matching(all: &BTreeSet<String>, patterns: &[glob::Pattern]) -> BTreeSet<String> {
    all.iter().filter(|n| patterns.iter().any(|p| p.matches(n))).cloned().collect()
}

/// Removes pins of TC links whose interface is gone (the kernel already
/// detached them).
pub fn forget_gone(pin_dir: &Path, present: &BTreeSet<String>) {
    let Ok(entries) = fs::read_dir(links_dir(pin_dir)) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(ifname) = name.strip_prefix(&format!("{TC_PROGRAM}@"))
            && !present.contains(ifname)
        {
            debug!(interface = ifname, "interface gone: forgetting its TC link");
            let _ = fs::remove_file(entry.path());
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
