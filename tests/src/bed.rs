//! A loaded dataplane on a private bpffs mount, removed on drop. Frontends
//! are programmed the way the agent programs them: a desired state planned
//! by the `Reconciler` and applied to the maps, never written by hand.

use std::{
    ffi::CString,
    net::{IpAddr, Ipv4Addr},
    os::unix::ffi::OsStrExt as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use lb_common::{FrontendKind, L4, Scope};
use lb_userspace::{
    frontend::Frontend,
    loader::{self, Capacities, TC_EGRESS_PROGRAM, TC_EXT_PROGRAM, TC_POD_PROGRAM, XDP_PROGRAM},
    maps::Maps,
    model::{Desired, DesiredBackend, DesiredFrontend},
    reconciler::{self, NodeSettings, Reconciler, keys},
};

pub struct Bed {
    pub ebpf: Ebpf,
    pub maps: Maps,
    pub pin_dir: PathBuf,
    desired: Desired,
    reconciler: Reconciler,
    settings: NodeSettings,
}

/// A backend as tests describe it.
#[derive(Clone, Copy)]
pub struct Be {
    pub addr: [u8; 4],
    pub port: u16,
    pub local: bool,
}

impl Be {
    pub const fn local(addr: [u8; 4], port: u16) -> Self {
        Self { addr, port, local: true }
    }
    pub const fn remote(addr: [u8; 4], port: u16) -> Self {
        Self { addr, port, local: false }
    }
}

/// A frontend of `kind` on `addr:port` (`[0; 4]`: a NodePort).
pub fn frontend(addr: [u8; 4], port: u16, l4: L4) -> Frontend {
    Frontend::new(Ipv4Addr::from(addr), port, l4)
}

/// What a frontend programs: `backends` take new connections; the rest of
/// the fields as a plain ClusterIP has them, for the test to change.
pub fn desired(kind: FrontendKind, backends: &[Be]) -> DesiredFrontend {
    let backends = backends
        .iter()
        .map(|b| DesiredBackend { addr: IpAddr::from(b.addr), port: b.port, local: b.local })
        .collect();
    DesiredFrontend::new("default/test", kind, backends)
}

/// What a program returned and the frame it left.
pub struct Run {
    pub action: u32,
    pub frame: Vec<u8>,
}

pub const NODE_ADDR: [u8; 4] = [192, 0, 2, 11];

static RUN: AtomicU32 = AtomicU32::new(0);

/// Map sizes and NAT ports, for tests of pressure.
#[derive(Clone, Debug)]
pub struct Options {
    pub capacities: Capacities,
    pub nat_ports: (u16, u16),
}

impl Default for Options {
    fn default() -> Self {
        Self {
            capacities: Capacities::default(),
            nat_ports: (lb_common::DEFAULT_NAT_PORT_MIN, lb_common::DEFAULT_NAT_PORT_MAX),
        }
    }
}

impl Bed {
    /// Loads the programs with maps pinned in a fresh per-test bpffs mount.
    pub fn new() -> Result<Self> {
        Self::with(Options::default())
    }

    pub fn with(options: Options) -> Result<Self> {
        crate::require_root();
        let pin_dir = std::env::temp_dir().join(format!(
            "lb-test-{}-{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed)
        ));
        let loaded = loader::load(&pin_dir, &options.capacities, Default::default()).and_then(|mut ebpf| {
            lb_userspace::attach::load_programs(&mut ebpf)?;
            let maps = Maps::from_ebpf(&mut ebpf)?;
            Ok((ebpf, maps))
        });
        // A load the kernel refuses leaves no mount behind.
        let (ebpf, maps) = loaded.inspect_err(|_| unmount(&pin_dir))?;
        let node = IpAddr::from(NODE_ADDR);
        let settings = NodeSettings {
            addresses: [node].into(),
            snat_addr: node,
            nat_ports: options.nat_ports,
            via_stack: false,
            service_cidrs: Vec::new(),
        };
        let mut bed = Self {
            ebpf,
            maps,
            pin_dir,
            desired: Desired::default(),
            reconciler: Reconciler::new(),
            settings,
        };
        bed.sync()?;
        Ok(bed)
    }

    fn sync(&mut self) -> Result<()> {
        let ops = self.reconciler.plan(&self.desired, &self.settings)?;
        reconciler::apply(&mut self.maps, &ops)?;
        Ok(())
    }

    /// Programs `key` as `fe` says (replacing what it was); returns its id.
    pub fn program(&mut self, key: Frontend, fe: DesiredFrontend) -> Result<u32> {
        self.desired.frontends.insert(key, Arc::new(fe));
        self.sync()?;
        self.id_of(key)
    }

    /// A frontend of `kind` with `backends`; returns its id.
    pub fn service(&mut self, key: Frontend, kind: FrontendKind, backends: &[Be]) -> Result<u32> {
        self.program(key, desired(kind, backends))
    }

    /// Changes what `key` programs.
    pub fn update(&mut self, key: Frontend, change: impl FnOnce(&mut DesiredFrontend)) -> Result<()> {
        let fe = self.desired.frontends.get_mut(&key).context("no such frontend")?;
        change(Arc::make_mut(fe));
        self.sync()
    }

    /// The frontend id the maps hold for `key`.
    pub fn id_of(&self, key: Frontend) -> Result<u32> {
        Ok(self.maps.services.get(&keys::frontend_key(&key)?, 0)?.id)
    }

    /// The id of the backend at `addr:port` for `l4`.
    pub fn backend_id(&self, addr: [u8; 4], port: u16, l4: L4) -> Option<u32> {
        self.maps
            .backends
            .iter()
            .filter_map(Result::ok)
            .find(|(_, b)| (b.addr, b.port, b.proto) == (addr, port, l4.proto()))
            .map(|(id, _)| id)
    }

    pub fn xdp(&self, frame: &[u8]) -> Result<Run> {
        let p: &Xdp = self.ebpf.program(XDP_PROGRAM).context("xdp")?.try_into()?;
        run(p, frame)
    }

    /// The pod program (TC at the host side of a pod's interface).
    pub fn tc(&self, frame: &[u8]) -> Result<Run> {
        let p: &SchedClassifier = self.ebpf.program(TC_POD_PROGRAM).context("tc")?.try_into()?;
        run(p, frame)
    }

    /// The egress program (pod and external interfaces), on a frame the
    /// host stack sends.
    pub fn tc_egress(&self, frame: &[u8]) -> Result<Run> {
        let p: &SchedClassifier = self.ebpf.program(TC_EGRESS_PROGRAM).context("tc egress")?.try_into()?;
        run(p, frame)
    }

    /// The north-south program at TC (external interfaces), received by
    /// the test run's own device (loopback, whose address is all zeros:
    /// the frame is addressed to it, or it would be another host's).
    pub fn tc_ext(&self, frame: &[u8]) -> Result<Run> {
        let p: &SchedClassifier = self.ebpf.program(TC_EXT_PROGRAM).context("tc ext")?.try_into()?;
        let mut frame = frame.to_vec();
        frame[..6].copy_from_slice(&[0; 6]);
        run(p, &frame)
    }

    /// TC program `program` on a frame received by interface `ifindex`;
    /// from a thread inside that interface's namespace.
    pub fn tc_on(&self, program: &str, frame: &[u8], ifindex: u32) -> Result<Run> {
        let p: &SchedClassifier = self.ebpf.program(program).context("tc")?.try_into()?;
        // struct __sk_buff: ingress_ifindex at 36, ifindex at 40.
        let mut ctx = [0u8; 192];
        ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let r = p.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok(Run { action: r.return_value, frame: out })
    }

    /// The service CIDRs of the ClusterIP catch-all (`--service-cidr`).
    pub fn set_service_cidrs(&mut self, cidrs: &[&str]) -> Result<()> {
        self.settings.service_cidrs = cidrs.iter().map(|c| c.parse()).collect::<Result<_, _>>()?;
        self.sync()
    }

    /// Hands translated packets to the host stack (`--forwarding stack`).
    pub fn set_via_stack(&mut self, via_stack: bool) -> Result<()> {
        self.settings.via_stack = via_stack;
        self.sync()
    }
}

/// An external frontend's in-cluster twin.
pub fn internal(key: Frontend) -> Frontend {
    key.with_scope(Scope::Internal)
}

fn run<P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>>(
    p: &P,
    frame: &[u8],
) -> Result<Run> {
    let mut out = vec![0u8; frame.len() + 256];
    let r =
        p.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() })?;
    out.truncate(r.data_size_out as usize);
    Ok(Run { action: r.return_value, frame: out })
}

impl Drop for Bed {
    fn drop(&mut self) {
        unmount(&self.pin_dir);
    }
}

/// Detaches a bed's private bpffs mount with all its pins, and removes it.
fn unmount(pin_dir: &std::path::Path) {
    if let Ok(path) = CString::new(pin_dir.as_os_str().as_bytes()) {
        // SAFETY: a valid path; lazily detaches the mount.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_dir_all(pin_dir);
}
