//! `cargo xtask <command>`: the project's workflow in one place.
//!
//! - `setup`: installs what is missing (Debian packages, Rust toolchains,
//!   bpf-linker) and nothing else; quiet when everything is there.
//! - `build-ebpf`: builds the XDP/TC object with the pinned nightly.
//! - `test`: setup, lints, then the whole test suite (root tests included;
//!   plain `cargo test` is the unprivileged inner loop).

mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// The eBPF crate needs this nightly; bpf-linker's LLVM must read its bitcode.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";
/// Host crates (also pinned in rust-toolchain.toml).
pub const HOST_TOOLCHAIN: &str = "1.99.0";
pub const BPF_LINKER_VERSION: &str = "0.13.0";
pub const LLVM_MAJOR: &str = "22";

#[derive(Parser)]
#[command(about = "Workflow commands of the eBPF service load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchains, bpf-linker and Debian packages that are missing.
    Setup,
    /// Build the eBPF objects (target/bpfel-unknown-none/release/lb-ebpf and lb-floor).
    BuildEbpf {
        /// Accepted as aya's template documents it; the build is always
        /// optimised (unoptimised BPF code does not fit the 512-byte stack).
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, and run the demo: a two-node cluster in network
    /// namespaces with real traffic to every example service (needs root).
    Demo,
    /// Measure the dataplane and the agent and write BENCHMARKS.md (needs root).
    Bench {
        /// A short smoke run (the test suite runs it), written to target/bench-quick.md.
        #[arg(long)]
        quick: bool,
        /// Passed to lb-bench after `--`: `--only packets` (part 1 alone),
        /// `--baseline-object PATH` (another lb-ebpf build measured beside
        /// this one in part 1), `--output FILE`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, check formatting and lints, and run every test (needs root).
    Test {
        /// Extra arguments passed to `cargo test` after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::ensure(),
        Cmd::BuildEbpf { release: _ } => {
            setup::ensure()?;
            let dir = build_ebpf()?;
            println!("eBPF objects: {}, {}", dir.join("lb-ebpf").display(), dir.join("lb-floor").display());
            Ok(())
        }
        Cmd::Test { args } => test(&args),
        Cmd::Demo => demo(),
        Cmd::Bench { quick, args } => bench(quick, &args),
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace").to_path_buf()
}

/// Always optimised: unoptimised BPF code exceeds the stack limit and is
/// rejected by LLVM's BPF backend (and the agent embeds a release build).
fn build_ebpf() -> Result<PathBuf> {
    let root = workspace_root();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .arg(format!("+{EBPF_TOOLCHAIN}"))
        .args(["build", "--release", "--package", "lb-ebpf", "--bins", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core"])
        // BTF for bpftool and aya; the same flags the agent's build uses.
        .env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf");
    run(&mut cmd)?;
    Ok(root.join("target/bpfel-unknown-none/release"))
}

fn demo() -> Result<()> {
    setup::ensure()?;
    if !setup::is_root() {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root");
    }
    let root = workspace_root();
    // The demo drives the agent binary and the pods' helper: build all three.
    run(Command::new("cargo").current_dir(&root).args(["build", "--release", "--package", "lb-userspace"]))?;
    run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--package",
        "lb-tests",
        "--bins",
    ]))?;
    run(Command::new(root.join("target/release/lb-demo")).current_dir(&root))
}

fn bench(quick: bool, args: &[String]) -> Result<()> {
    setup::ensure()?;
    if !setup::is_root() {
        bail!("the benchmarks load eBPF programs and build network namespaces: run them as root");
    }
    let root = workspace_root();
    run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--package",
        "lb-userspace",
        "--package",
        "lb-tests",
        "--bins",
    ]))?;
    let output = match args.iter().position(|a| a == "--output") {
        Some(i) => args.get(i + 1).context("--output needs a file")?.clone(),
        None if quick => "target/bench-quick.md".into(),
        None => "BENCHMARKS.md".into(),
    };
    let mut cmd = Command::new(root.join("target/release/lb-bench"));
    cmd.current_dir(&root).args(args);
    if !args.iter().any(|a| a == "--output") {
        cmd.args(["--output", &output]);
    }
    if quick {
        cmd.arg("--quick");
    }
    run(&mut cmd)?;
    println!("wrote {output}");
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    setup::ensure()?;
    if !setup::is_root() {
        bail!(
            "the test suite loads eBPF programs and builds network namespaces: run it as root \
             (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN are needed)"
        );
    }
    let root = workspace_root();
    run(Command::new("cargo").current_dir(&root).args(["fmt", "--all", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
    run(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The kernel programs are linted for the target they are built for.
    run(Command::new("cargo")
        .current_dir(&root)
        .arg(format!("+{EBPF_TOOLCHAIN}"))
        .args(["clippy", "--package", "lb-ebpf", "--bins", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core", "--", "-D", "warnings"]))?;
    // The integration tests drive the binaries (lb-agent, lb-netcheck,
    // lb-bench); `cargo test` alone builds only their test harnesses.
    run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--bins",
    ]))?;
    // Everything, the root tests included (feature `root`; without it they
    // are listed as ignored). They share the machine's two cores and its
    // kernel: two at a time.
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .args(["test", "--workspace", "--exclude", "lb-ebpf", "--features", "lb-tests/root"])
        .args(["--", "--test-threads=2"])
        .args(args);
    run(&mut cmd)
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
