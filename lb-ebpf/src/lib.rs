//! Present so that `lb-userspace` can name this crate as a build dependency
//! (cargo then rebuilds the agent when the programs change). The programs
//! themselves are the `lb-ebpf` binary, built for `bpfel-unknown-none`.
#![no_std]
