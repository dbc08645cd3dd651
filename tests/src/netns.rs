//! Network namespaces, veth pairs, cgroups, a private bpffs and agent
//! processes for real-traffic tests. Everything is created inside
//! namespaces (and child cgroups) this harness makes, never the machine's
//! own, named with a per-run prefix, and removed on drop, also when a test
//! fails.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The prefix of everything this process creates.
pub fn run_prefix() -> String {
    format!("lbt{}", std::process::id() % 100_000)
}

/// Removes whatever this run created (namespaces with their processes, and
/// bpffs mounts): the Ctrl-C path, where destructors do not run.
pub fn cleanup_run() {
    let prefix = run_prefix();
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else { continue };
            if !name.starts_with(&prefix) {
                continue;
            }
            if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
                for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                // A cgroup mount: its test cgroups go first (they outlive the mount).
                if e.path().join("cgroup.procs").exists() {
                    for sub in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                        if sub.file_name().to_string_lossy().starts_with(&prefix) {
                            Cgroup::remove(&sub.path());
                        }
                    }
                }
                let _ = Command::new("umount").arg("-l").arg(e.path()).status();
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// On Ctrl-C (or SIGTERM), clean up and exit. Installed once per process.
pub fn cleanup_on_interrupt() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            eprintln!("interrupted: removing the test namespaces");
            cleanup_run();
            std::process::exit(130);
        });
    });
}

/// A folder under the temp dir, removed on drop (a failed test's too).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A per-process, per-call unique short prefix (interface names are ≤ 15 chars).
pub fn unique(tag: &str) -> String {
    format!("{}{}{}", run_prefix(), tag, SEQ.fetch_add(1, Ordering::Relaxed))
}

pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Self> {
        let name = unique(tag);
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command run inside the namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(self.cmd("sysctl").args(["-qw", &format!("{key}={value}")])).map(|_| ())
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(format!("/run/netns/{}", self.name))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: a valid netns fd; setns affects this thread only.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns {}: {}", self.name, std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
        })
    }
}

/// Where a test command runs: a namespace, or a node's host processes.
pub trait Place {
    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command;
}

impl<T: Place> Place for &T {
    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        (**self).cmd(program)
    }
}

impl Place for Netns {
    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        Netns::cmd(self, program)
    }
}

/// A node's own namespace, inside the node's cgroup: where the kubelet
/// and hostNetwork pods run.
pub struct HostProcess<'a> {
    pub ns: &'a Netns,
    pub cgroup: &'a Cgroup,
}

impl Place for HostProcess<'_> {
    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = self.ns.cmd(program);
        self.cgroup.adopt(&mut cmd).expect("the test cgroup's cgroup.procs opens");
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A veth pair from `a` (named `a_if`) to `b` (named `b_if`), both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    a.ip(&["link", "add", "name", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// A private bpffs mount for one test's pins; unmounted on drop.
pub struct Bpffs {
    pub dir: PathBuf,
}

impl Bpffs {
    pub fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("bpf"));
        std::fs::create_dir_all(&dir)?;
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir))?;
        Ok(Self { dir })
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `lb-agent` binary built beside the test binaries.
/// A child cgroup of the machine's cgroup v2 hierarchy, for a node's
/// "host" processes: the socket hooks of that node's agent attach here
/// (never to the root). The hierarchy is mounted again under the temp dir
/// for it, since `ip netns exec` hides /sys/fs/cgroup from the commands it
/// runs. On drop its processes are killed, the cgroup removed and the
/// mount undone.
pub struct Cgroup {
    pub dir: PathBuf,
    mount: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> Result<Self> {
        let mount = std::env::temp_dir().join(unique("cgmnt"));
        std::fs::create_dir_all(&mount)?;
        run(Command::new("mount").args(["-t", "cgroup2", "none"]).arg(&mount))
            .context("mounting cgroup v2: the socket tests need it")?;
        let cgroup = Self { dir: mount.join(unique(tag)), mount };
        std::fs::create_dir(&cgroup.dir)
            .with_context(|| format!("creating cgroup {}", cgroup.dir.display()))?;
        Ok(cgroup)
    }

    /// Makes `cmd`'s process start inside this cgroup.
    pub fn adopt<'c>(&self, cmd: &'c mut Command) -> Result<&'c mut Command> {
        use std::os::unix::process::CommandExt as _;
        let procs = std::fs::OpenOptions::new().write(true).open(self.dir.join("cgroup.procs"))?;
        // SAFETY: between fork and exec only write(2) on an fd opened
        // before the fork: async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writing process.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        Ok(cmd)
    }

    fn remove(dir: &Path) {
        // cgroup.kill (5.14+) ends whatever is left, then the directory can go.
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        Self::remove(&self.dir);
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = std::fs::remove_dir(&self.mount);
    }
}

pub fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("own binary path");
    // Beside the demo (target/<profile>/), or one up from a test binary
    // (target/<profile>/deps/).
    let dir = exe.parent().expect("binary dir");
    let beside = dir.join("lb-agent");
    let bin = if beside.exists() { beside } else { dir.parent().expect("target dir").join("lb-agent") };
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (`cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// `lb-agent` running in a namespace; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    /// Starts `lb-agent args` in `ns`. The socket hooks stay off unless the
    /// arguments give the agent a cgroup of its own (`--cgroup-root`): a
    /// test never attaches to the machine's cgroup root.
    pub fn start<S: AsRef<std::ffi::OsStr>>(ns: &Netns, args: &[S]) -> Result<Self> {
        Self::start_in(ns, args, None)
    }

    /// `start`, with the agent's own process inside `cgroup` (as a
    /// DaemonSet's agent is inside the root its hooks serve).
    pub fn start_in<S: AsRef<std::ffi::OsStr>>(
        ns: &Netns,
        args: &[S],
        cgroup: Option<&Cgroup>,
    ) -> Result<Self> {
        let given = |flag: &str| args.iter().any(|a| a.as_ref() == flag);
        let hooks_on = args.windows(2).any(|w| w[0].as_ref() == "--socket-lb" && w[1].as_ref() != "off");
        if hooks_on && !given("--cgroup-root") {
            bail!("a test agent with socket hooks needs --cgroup-root: never the machine's own root");
        }
        let log = std::env::temp_dir().join(format!("{}.log", unique("agent")));
        let out = File::create(&log)?;
        let mut cmd = ns.cmd(agent_binary());
        if !given("--cgroup-root") {
            cmd.env("LB_SOCKET_LB", "off");
        }
        if let Some(cgroup) = cgroup {
            cgroup.adopt(&mut cmd)?;
        }
        let child = cmd
            .args(args)
            // LB_TEST_AGENT_LOG=debug shows the programs' own messages too.
            .env("LB_LOG", std::env::var("LB_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .context("starting lb-agent")?;
        Ok(Self { child, log })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the agent the way a rolling update would (SIGTERM).
    pub fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.terminate();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Polls `check` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
