//! Idempotent installation of everything the build and the tests need.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::{BPF_LINKER_VERSION, EBPF_TOOLCHAIN, HOST_TOOLCHAIN, LLVM_MAJOR, run};

/// Debian packages: LLVM for bpf-linker, and the network tools the tests,
/// the demo and the benchmarks drive.
fn debian_packages() -> Vec<String> {
    let mut p: Vec<String> =
        ["bpftool", "iproute2", "ethtool", "iptables", "nftables", "wrk", "curl", "procps"]
            .map(String::from)
            .to_vec();
    p.push(format!("llvm-{LLVM_MAJOR}-dev"));
    p.push(format!("libpolly-{LLVM_MAJOR}-dev"));
    p
}

pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.trim_ascii() == b"0").unwrap_or(false)
}

pub fn ensure() -> Result<()> {
    apt_packages()?;
    toolchains()?;
    bpf_linker()
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .map(|o| o.stdout.ends_with(b"install ok installed"))
        .unwrap_or(false)
}

fn apt_packages() -> Result<()> {
    let missing: Vec<String> = debian_packages().into_iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {}: install them as root (apt-get install -y ...)", missing.join(" "));
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn toolchain_installed(name: &str) -> bool {
    Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with(name)))
        .unwrap_or(false)
}

fn toolchains() -> Result<()> {
    if !toolchain_installed(HOST_TOOLCHAIN) {
        eprintln!("setup: installing Rust {HOST_TOOLCHAIN}");
        run(Command::new("rustup")
            .args(["toolchain", "install", HOST_TOOLCHAIN, "--profile", "minimal"])
            .args(["-c", "clippy,rustfmt"]))?;
    }
    let has_components = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", EBPF_TOOLCHAIN])
        .output()
        .map(|o| {
            let listed = String::from_utf8_lossy(&o.stdout);
            ["rust-src", "clippy"].iter().all(|c| listed.lines().any(|l| l.starts_with(c)))
        })
        .unwrap_or(false);
    if !toolchain_installed(EBPF_TOOLCHAIN) || !has_components {
        eprintln!("setup: installing {EBPF_TOOLCHAIN} with rust-src and clippy");
        run(Command::new("rustup")
            .args(["toolchain", "install", EBPF_TOOLCHAIN, "--profile", "minimal"])
            .args(["--component", "rust-src,clippy"]))?;
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = version
        && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about 2 minutes)");
    let path = format!("/usr/lib/llvm-{LLVM_MAJOR}/bin:{}", std::env::var("PATH").unwrap_or_default());
    run(Command::new("cargo")
        .arg(format!("+{HOST_TOOLCHAIN}"))
        .args(["install", "bpf-linker", "--locked", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", &format!("llvm-{LLVM_MAJOR}")])
        .env("PATH", path))
    .context("installing bpf-linker")
}
