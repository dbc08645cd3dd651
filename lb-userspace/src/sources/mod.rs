//! Where Services and EndpointSlices come from.

pub mod kubernetes;
pub mod manifests;
