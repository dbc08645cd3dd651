//! Types and pure logic shared by the kernel programs (`lb-ebpf`) and the agent
//! (`lb-userspace`).
//!
//! Everything here is `no_std` and allocation-free so the eBPF side can use it;
//! the same code is unit-tested on the host.
#![no_std]

pub mod crc32c;
pub mod csum;
pub mod floor;
pub mod icmp;
pub mod l4;
pub mod maps;
pub mod registry;

pub use l4::*;
pub use maps::*;
