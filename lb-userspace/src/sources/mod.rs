//! Where Services and EndpointSlices come from: the API server, or a
//! folder of manifests. Either way the agent gets a signal when something
//! changed, and then reads a whole state, with the Node's facts.

pub mod kubernetes;
pub mod manifests;

use std::borrow::Cow;

use crate::model::ClusterState;

pub use self::kubernetes::NodeFacts;

pub enum Source {
    Manifests {
        folder: manifests::Folder,
        /// The watch's: its last signal was a settle timeout.
        settled_only: std::sync::Arc<std::sync::atomic::AtomicBool>,
    },
    Kubernetes(kubernetes::KubeSource),
}

/// What a source holds now.
pub struct Snapshot<'a> {
    pub state: Cow<'a, ClusterState>,
    /// Files and objects that could not be read (manifests only).
    pub errors: Vec<manifests::ManifestError>,
    /// What the cluster says about this node (Kubernetes only).
    pub node: NodeFacts,
    /// Read again soon, though no change may be signalled (a file still
    /// being written, a folder that could not be listed).
    pub retry: bool,
}

impl Source {
    pub fn snapshot(&mut self) -> Snapshot<'_> {
        match self {
            Source::Manifests { folder, settled_only } => {
                let wary =
                    settled_only.swap(false, std::sync::atomic::Ordering::Relaxed) || folder.retry_soon();
                let (_, errors) = if wary { folder.refresh_wary() } else { folder.refresh() };
                let retry = folder.retry_soon();
                Snapshot { state: Cow::Borrowed(folder.state()), errors, node: NodeFacts::default(), retry }
            }
            Source::Kubernetes(k) => {
                Snapshot { state: Cow::Owned(k.snapshot()), errors: Vec::new(), node: k.node(), retry: false }
            }
        }
    }
}
