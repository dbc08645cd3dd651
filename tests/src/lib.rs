//! Shared harness of the integration tests (and the demo).
//!
//! - `bed`: the real eBPF object loaded with its maps pinned under a private
//!   bpffs, for packet-in/packet-out tests through BPF_PROG_TEST_RUN.
//! - `packet`: building test frames and checking frames that come out, with
//!   etherparse as the independent parser.

pub mod bed;
pub mod bench;
pub mod cluster;
pub mod fake_api;
pub mod kube_proxy;
pub mod lanes;
pub mod netns;
pub mod packet;

/// Fails (never skips) when the test cannot run for lack of privileges.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loads eBPF programs and needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); \
         run it through `cargo xtask test` as root"
    );
}
