//! A loaded dataplane on a private bpffs mount, removed on drop.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    AffinityMatchKey, Backend, Config, Frontend, FrontendKey, FrontendKind, SlotKey, SourceRangeKey,
    backend_flags,
};
use lb_userspace::{
    loader::{self, Capacities, TC_PROGRAM, XDP_PROGRAM},
    maps::Maps,
};

pub struct Bed {
    pub ebpf: Ebpf,
    pub maps: Maps,
    pub pin_dir: PathBuf,
    next_backend: u32,
    next_frontend: u32,
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

/// What a program returned and the frame it left.
pub struct Run {
    pub action: u32,
    pub frame: Vec<u8>,
}

pub const NODE_ADDR: [u8; 4] = [192, 0, 2, 11];

static RUN: AtomicU32 = AtomicU32::new(0);

impl Bed {
    /// Loads the programs with maps pinned in a fresh per-test bpffs mount.
    pub fn new() -> Result<Self> {
        crate::require_root();
        let pin_dir = std::env::temp_dir().join(format!(
            "lb-test-{}-{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed)
        ));
        let mut ebpf = loader::load(&pin_dir, &Capacities::default())?;
        let xdp: &mut Xdp = ebpf.program_mut(XDP_PROGRAM).context("xdp program")?.try_into()?;
        xdp.load()?;
        let tc: &mut SchedClassifier = ebpf.program_mut(TC_PROGRAM).context("tc program")?.try_into()?;
        tc.load()?;
        let mut maps = Maps::from_ebpf(&mut ebpf)?;
        maps.config.set(
            0,
            &Config {
                snat_addr: NODE_ADDR,
                nat_port_min: lb_common::DEFAULT_NAT_PORT_MIN,
                nat_port_max: lb_common::DEFAULT_NAT_PORT_MAX,
            },
            0,
        )?;
        maps.node_addrs.insert(&NODE_ADDR, &1, 0)?;
        Ok(Self { ebpf, maps, pin_dir, next_backend: 1, next_frontend: 1 })
    }

    /// Programs one frontend with `backends` in its slots; returns its id.
    pub fn service(
        &mut self,
        key: FrontendKey,
        kind: FrontendKind,
        flags: u8,
        backends: &[Be],
    ) -> Result<u32> {
        let id = self.next_frontend;
        self.next_frontend += 1;
        for (slot, be) in backends.iter().enumerate() {
            let bid = self.next_backend;
            self.next_backend += 1;
            let flags = if be.local { backend_flags::LOCAL } else { 0 };
            self.maps.backends.insert(
                &bid,
                &Backend { addr: be.addr, port: be.port, proto: key.proto, flags },
                0,
            )?;
            self.maps.slots.insert(&SlotKey { frontend_id: id, slot: slot as u32 }, &bid, 0)?;
            self.maps.affinity_match.insert(
                &AffinityMatchKey { frontend_id: id, backend_id: bid },
                &(slot as u32),
                0,
            )?;
        }
        let fe = Frontend {
            id,
            backend_count: backends.len() as u32,
            affinity_timeout: 10_800,
            kind: kind as u8,
            flags,
            _pad: 0,
        };
        self.maps.services.insert(&key, &fe, 0)?;
        Ok(id)
    }

    pub fn allow_source(&mut self, frontend_id: u32, addr: [u8; 4], cidr_len: u8) -> Result<()> {
        let key = aya::maps::lpm_trie::Key::new(
            SourceRangeKey::prefix_len(cidr_len),
            SourceRangeKey::new(frontend_id, addr),
        );
        self.maps.source_ranges.insert(&key, &1, 0)?;
        Ok(())
    }

    pub fn xdp(&self, frame: &[u8]) -> Result<Run> {
        let p: &Xdp = self.ebpf.program(XDP_PROGRAM).context("xdp")?.try_into()?;
        run(p, frame)
    }

    pub fn tc(&self, frame: &[u8]) -> Result<Run> {
        let p: &SchedClassifier = self.ebpf.program(TC_PROGRAM).context("tc")?.try_into()?;
        run(p, frame)
    }
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
        if let Ok(path) = CString::new(self.pin_dir.as_os_str().as_bytes()) {
            // SAFETY: valid path; lazily detaches our private mount with all pins.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}
