//! Loading the programs with their maps pinned under one bpffs directory.
//!
//! Maps are declared `pin_by_name`, so a load reuses the maps an earlier run
//! pinned (and their contents): a restarted agent adopts the live dataplane.

use std::{ffi::CString, fs, os::unix::ffi::OsStrExt as _, path::Path};

use anyhow::{Context as _, Result, bail};
use aya::{Ebpf, EbpfLoader};
use lb_common::{MAP_AFFINITY, MAP_BACKENDS, MAP_CONNTRACK, MAP_SERVICES, MAP_SLOTS, capacity};

/// The eBPF object built by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Reference programs (`floor_pass`, `floor_tx`, `floor_drop`) for test
/// topologies and benchmarks; the agent does not load them.
pub static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-floor"));

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";
pub const XDP_PROGRAM: &str = "lb_xdp";
pub const TC_PROGRAM: &str = "lb_tc_pod";

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Map sizes. Changing one for an existing pin directory needs `lb-agent
/// reset` first: a pinned map keeps the size it was created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub services: u32,
    pub backends: u32,
    pub slots: u32,
    pub conntrack: u32,
    pub affinity: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            services: capacity::SERVICES,
            backends: capacity::BACKENDS,
            slots: capacity::SLOTS,
            conntrack: capacity::CONNTRACK,
            affinity: capacity::AFFINITY,
        }
    }
}

/// Makes sure `dir` exists on a bpffs, mounting one there if it does not.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating pin directory {}", dir.display()))?;
    if is_bpffs(dir)? {
        return Ok(());
    }
    let target = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        bail!("mounting bpffs on {}: {}", dir.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn is_bpffs(dir: &Path) -> Result<bool> {
    let path = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        bail!("statfs {}: {}", dir.display(), std::io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Loads the object with its maps pinned (or adopted) under `pin_dir`.
pub fn load(pin_dir: &Path, caps: &Capacities) -> Result<Ebpf> {
    ensure_bpffs(pin_dir)?;
    // The programs skip formatting log events below the agent's level.
    let log_level = log::max_level() as u8;
    let ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .override_global(aya_log::LEVEL, &log_level, false)
        .map_max_entries(MAP_SERVICES, caps.services)
        .map_max_entries(MAP_BACKENDS, caps.backends)
        .map_max_entries(MAP_SLOTS, caps.slots)
        .map_max_entries(MAP_CONNTRACK, caps.conntrack)
        .map_max_entries(MAP_AFFINITY, caps.affinity)
        .load(EBPF_OBJECT)
        .with_context(|| {
            format!(
                "loading the eBPF object with maps pinned under {} (if the map sizes changed, \
                 run `lb-agent reset` first)",
                pin_dir.display()
            )
        })?;
    Ok(ebpf)
}
