//! Where Services and EndpointSlices come from: the API server, or a
//! folder of manifests. Either way the agent gets a signal when something
//! changed, and then reads a whole state, with the Node's facts.

pub mod kubernetes;
pub mod manifests;

use std::borrow::Cow;

use crate::model::ClusterState;

pub use self::kubernetes::NodeFacts;

pub enum Source {
    Manifests(manifests::Folder),
    Kubernetes(kubernetes::KubeSource),
}

/// What a source holds now.
pub struct Snapshot<'a> {
    pub state: Cow<'a, ClusterState>,
    /// Files and objects that could not be read (manifests only).
    pub errors: Vec<manifests::ManifestError>,
    /// What the cluster says about this node (Kubernetes only).
    pub node: NodeFacts,
}

impl Source {
    pub fn snapshot(&mut self) -> Snapshot<'_> {
        match self {
            Source::Manifests(folder) => {
                let (state, errors) = folder.refresh();
                Snapshot { state: Cow::Borrowed(state), errors, node: NodeFacts::default() }
            }
            Source::Kubernetes(k) => {
                Snapshot { state: Cow::Owned(k.snapshot()), errors: Vec::new(), node: k.node() }
            }
        }
    }
}
