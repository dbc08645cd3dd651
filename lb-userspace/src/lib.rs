//! The node agent of the eBPF service load balancer.
//!
//! sources (Kubernetes, manifests) → model (kube-proxy semantics, a pure
//! function) → reconciler (diff against the pinned maps) → loader (programs,
//! pins, attachments). `main.rs` is the CLI on top.

pub mod agent;
pub mod attach;
pub mod dataplane;
pub mod frontend;
pub mod inspect;
pub mod loader;
pub mod maps;
pub mod model;
pub mod reconciler;
pub mod socket_lb;
pub mod sorted;
pub mod sources;
pub mod telemetry;
