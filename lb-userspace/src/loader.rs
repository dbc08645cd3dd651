//! Loading the programs with their maps pinned under one bpffs directory.
//!
//! Maps are declared `pin_by_name`, so a load reuses the maps an earlier run
//! pinned (and their contents): a restarted agent adopts the live dataplane.

use std::{collections::BTreeMap, ffi::CString, fs, os::unix::ffi::OsStrExt as _, path::Path};

use anyhow::{Context as _, Result, bail};
use aya::{Ebpf, EbpfError, EbpfLoader, maps::MapError};
use lb_common::registry::{MAPS, MapDef, Size};

/// The eBPF object built by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Reference programs (`floor_pass`, `floor_tx`, `floor_drop`) for test
/// topologies and benchmarks; the agent does not load them.
pub static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-floor"));

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";
pub const XDP_PROGRAM: &str = "lb_xdp";
pub const TC_EXT_PROGRAM: &str = "lb_tc_ext";
pub const TC_POD_PROGRAM: &str = "lb_tc_pod";
/// At egress of both kinds of interface: replies of hostNetwork endpoints.
pub const TC_EGRESS_PROGRAM: &str = "lb_tc_egress";
/// The cgroup socket hooks, each with the attach type it is built for
/// (the `6` ones serve IPv4-mapped peers of dual-stack sockets).
pub const SOCK_PROGRAMS: [&str; 8] = [
    "lb_sock_connect4",
    "lb_sock_sendmsg4",
    "lb_sock_recvmsg4",
    "lb_sock_peer4",
    "lb_sock_connect6",
    "lb_sock_sendmsg6",
    "lb_sock_recvmsg6",
    "lb_sock_peer6",
];

/// Whose sockets the socket hooks serve: fixed at load time, as the
/// programs' constants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketHooks {
    /// The node's network namespace (its cookie); 0 serves none.
    pub host_netns_cookie: u64,
    /// Pods' sockets too (`--socket-lb all`).
    pub pods: bool,
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Map sizes, by the registry's size flags (`--max-frontends`...): the
/// registry's defaults unless set. Changing one for an existing pin
/// directory needs `lb-agent reset` first: a pinned map keeps the size it
/// was created with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capacities(BTreeMap<&'static str, u32>);

impl Default for Capacities {
    fn default() -> Self {
        Self(Self::flags().map(|(flag, default, _)| (flag, default)).collect())
    }
}

impl Capacities {
    /// The defaults for this node: the conntrack table grows with the CPUs
    /// as kube-proxy sizes netfilter's (32,768 flows per CPU, at least
    /// 131,072; two entries per flow here).
    pub fn for_node(cpus: u32) -> Self {
        let mut caps = Self::default();
        caps.set("conntrack-size", conntrack_entries(cpus));
        caps
    }

    /// Every size flag of the registry once: (flag, default, maps it sizes).
    pub fn flags() -> impl Iterator<Item = (&'static str, u32, Vec<&'static str>)> {
        let mut flags: BTreeMap<&'static str, (u32, Vec<&'static str>)> = BTreeMap::new();
        for m in MAPS {
            if let Size::Flag { flag, default } = m.size {
                flags.entry(flag).or_insert((default, Vec::new())).1.push(m.name);
            }
        }
        flags.into_iter().map(|(flag, (default, maps))| (flag, default, maps))
    }

    /// Sets the size `--<flag>` gives; unknown flags are a bug of the caller.
    pub fn set(&mut self, flag: &str, entries: u32) -> &mut Self {
        let slot = self.0.iter_mut().find(|(f, _)| **f == flag).map(|(_, v)| v);
        *slot.unwrap_or_else(|| panic!("no map is sized by --{flag}")) = entries;
        self
    }

    /// The capacity `map` is created with.
    pub fn of(&self, map: &MapDef) -> u32 {
        match map.size {
            Size::Fixed(n) => n,
            Size::Flag { flag, default } => self.0.get(flag).copied().unwrap_or(default),
        }
    }
}

/// Conntrack entries for a node of `cpus` CPUs (see `Capacities::for_node`).
pub const fn conntrack_entries(cpus: u32) -> u32 {
    let flows = 32_768 * cpus;
    2 * if flows > 131_072 { flows } else { 131_072 }
}

/// Where systemd mounts bpffs, and where the agent mounts it when nothing is.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Makes sure `dir` is a directory on a bpffs. Under `/sys/fs/bpf` with
/// nothing mounted there (hosts without systemd's mount: that directory is
/// then an empty sysfs one, where nothing can be created), bpffs is
/// mounted on `/sys/fs/bpf` first; anywhere else `dir` itself becomes the
/// mount point.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let root = Path::new(BPFFS_ROOT);
    if dir.starts_with(root) && !is_bpffs(root)? {
        mount_bpffs(root)?;
        tracing::info!(path = BPFFS_ROOT, "bpffs was not mounted: mounted it");
    }
    fs::create_dir_all(dir).with_context(|| format!("creating pin directory {}", dir.display()))?;
    if !is_bpffs(dir)? {
        mount_bpffs(dir)?;
    }
    Ok(())
}

fn mount_bpffs(dir: &Path) -> Result<()> {
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
pub fn load(pin_dir: &Path, caps: &Capacities, sockets: SocketHooks) -> Result<Ebpf> {
    load_object(EBPF_OBJECT, pin_dir, caps, sockets)
}

/// Loads `object` (the agent's own, or another build of it in benchmarks)
/// with the registry's maps sized and pinned under `pin_dir`.
pub fn load_object(object: &[u8], pin_dir: &Path, caps: &Capacities, sockets: SocketHooks) -> Result<Ebpf> {
    ensure_bpffs(pin_dir)?;
    // The programs skip formatting log events below the agent's level.
    let log_level = log::max_level() as u8;
    let mut loader = EbpfLoader::new();
    // (Builds before 0.2 declared their pins in the object.)
    let pods = u8::from(sockets.pods);
    loader
        .default_map_pin_directory(pin_dir)
        .override_global(aya_log::LEVEL, &log_level, false)
        .override_global("HOST_NETNS_COOKIE", &sockets.host_netns_cookie, false)
        .override_global("SOCKET_LB_PODS", &pods, false);
    for m in MAPS {
        loader.map_max_entries(m.name, caps.of(m));
        if m.pinned {
            loader.map_pin_path(m.name, pin_dir.join(m.name));
        }
    }
    loader.load(object).map_err(|e| match e {
        EbpfError::MapError(MapError::IncompatiblePinnedMap { name, property, expected, actual }) => {
            anyhow::anyhow!(
                "the map {name} pinned under {} has {property} {actual}, this agent needs {expected}: it was \
                 made by another version of the agent or with other map sizes. Run `lb-agent reset` (established \
                 connections through this node break) or start with the sizes it was made with",
                pin_dir.display()
            )
        }
        e => anyhow::Error::new(e).context(format!("loading the eBPF object with maps pinned under {}", pin_dir.display())),
    })
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, mem::size_of};

    use aya::maps::MapType as Kernel;
    use lb_common::{registry::MapType, *};

    use super::*;

    fn kernel_type(t: MapType) -> u32 {
        (match t {
            MapType::Hash => Kernel::Hash,
            MapType::LruHash => Kernel::LruHash,
            MapType::Array => Kernel::Array,
            MapType::PerCpuArray => Kernel::PerCpuArray,
            MapType::LpmTrie => Kernel::LpmTrie,
        }) as u32
    }

    /// The built object declares exactly the registry's maps, with its
    /// types and capacities and the key and value types of `lb_common`.
    #[test]
    fn the_object_defines_exactly_the_registry_maps() {
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the eBPF object parses");
        // aya-log's ring buffer and the programs' global data are aya's own.
        let ours: BTreeMap<&str, &aya_obj::Map> = obj
            .maps
            .iter()
            .filter(|(name, _)| !name.starts_with('.') && !name.starts_with("AYA_"))
            .map(|(name, m)| (name.as_str(), m))
            .collect();
        let names: Vec<&str> = ours.keys().copied().collect();
        let mut expected: Vec<&str> = MAPS.iter().map(|m| m.name).collect();
        expected.sort();
        assert_eq!(names, expected, "maps in the object vs lb_common::registry");
        let sizes: BTreeMap<&str, (usize, usize)> = [
            (registry::CONFIG.name, (4, size_of::<Config>())),
            (registry::NODE_ADDRS.name, (4, 4)),
            (registry::BACKENDS.name, (4, size_of::<Backend>())),
            (registry::SLOTS.name, (size_of::<SlotKey>(), 4)),
            (registry::AFFINITY_MATCH.name, (size_of::<AffinityMatchKey>(), 4)),
            (registry::SOURCE_RANGES.name, (4 + size_of::<SourceRangeKey>(), 4)),
            (registry::SERVICE_NAMES.name, (4, size_of::<ServiceName>())),
            (registry::SERVICES.name, (size_of::<FrontendKey>(), size_of::<Frontend>())),
            (registry::CONNTRACK.name, (size_of::<CtKey>(), size_of::<CtEntry>())),
            (registry::AFFINITY.name, (size_of::<AffinityKey>(), size_of::<AffinityEntry>())),
            (registry::SVC_STATS.name, (4, size_of::<SvcStats>())),
            (registry::DROPS.name, (4, 8)),
            (registry::NEXT_HOPS.name, (4, size_of::<NextHop>())),
            (registry::SOCK_REV.name, (size_of::<SockKey>(), size_of::<SockService>())),
            (registry::FRAGMENTS.name, (size_of::<FragKey>(), size_of::<FragEntry>())),
        ]
        .into();
        for def in MAPS {
            let m = ours[def.name];
            assert_eq!(m.map_type(), kernel_type(def.map_type), "{}: type", def.name);
            assert_eq!(m.max_entries(), def.capacity(), "{}: capacity", def.name);
            if let Some((key, value)) = sizes.get(def.name) {
                assert_eq!(
                    (m.key_size() as usize, m.value_size() as usize),
                    (*key, *value),
                    "{}: key, value",
                    def.name
                );
            }
        }
    }

    #[test]
    fn one_flag_sizes_every_map_that_names_it() {
        let mut caps = Capacities::default();
        caps.set("max-frontends", 1024);
        assert_eq!(caps.of(&registry::SERVICES), 1024);
        assert_eq!(caps.of(&registry::SERVICE_NAMES), 1024);
        assert_eq!(caps.of(&registry::BACKENDS), registry::BACKENDS.capacity());
        assert_eq!(caps.of(&registry::DROPS), Drop::SLOTS);
        let flags: Vec<&str> = Capacities::flags().map(|(f, _, _)| f).collect();
        assert_eq!(
            flags,
            [
                "affinity-size",
                "conntrack-size",
                "max-backends",
                "max-endpoints",
                "max-frontends",
                "max-slots",
                "sock-rev-size"
            ]
        );
    }
}
