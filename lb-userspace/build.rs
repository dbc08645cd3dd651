//! Builds the eBPF programs with the pinned nightly and bpf-linker (see
//! `cargo xtask setup`) and leaves the object in OUT_DIR for `include_bytes!`.
use aya_build::{Package, Toolchain};

/// Keep in step with xtask's `EBPF_TOOLCHAIN` and the README.
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";

fn main() -> aya_build::Result<()> {
    let ebpf = Package { name: "lb-ebpf", root_dir: "../lb-ebpf", ..Default::default() };
    println!("cargo:rerun-if-changed=../lb-common/src");
    aya_build::build_ebpf([ebpf], Toolchain::Custom(EBPF_TOOLCHAIN))
}
