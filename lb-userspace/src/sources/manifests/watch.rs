//! Following a manifests folder: a signal whenever it should be read again.
//!
//! Watched: the folder, and its parent (so that a folder created after the
//! agent started, or replaced by a rename, is picked up: its watch is set
//! again). Inside the folder, manifests and the `..data` links a kubelet
//! swaps when it updates a ConfigMap volume count; editors' swap files and
//! writers' temporary files do not.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Result;
use notify::{
    RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode, EventKind, ModifyKind},
};
use tokio::sync::mpsc;
use tracing::debug;

use super::is_manifest;

/// How long a manifest being written may stay open before it is read anyway.
const SETTLE: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Raw {
    /// A manifest was closed after writing, renamed or removed: read now.
    Now,
    /// One is being written: read once it is closed, or after `SETTLE`.
    Settling,
    /// The folder itself came, went or was replaced: watch it again.
    Rewatch,
}

/// Follows the manifests at `path` until dropped: signals `changed` once
/// they should be read again.
pub struct Watch {
    _watcher: Arc<Mutex<notify::RecommendedWatcher>>,
    /// Set when the last signal came from the settle timeout rather than a
    /// writer closing or renaming its file: read warily then.
    pub settled_only: Arc<AtomicBool>,
}

impl Watch {
    pub fn start(path: &Path, changed: mpsc::Sender<()>) -> Result<Self> {
        let single = path.is_file();
        // The folder to watch (a single file's parent), and where it lives.
        let folder =
            if single { path.parent().unwrap_or(Path::new(".")).to_path_buf() } else { path.to_path_buf() };
        let parent = folder.parent().map(Path::to_path_buf);
        let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<Raw>();
        let (file, dir) = (single.then(|| path.to_path_buf()), folder.clone());
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if let Some(raw) = classify(&event, file.as_deref(), &dir) {
                let _ = raw_tx.send(raw);
            }
        })?;
        let watcher = Arc::new(Mutex::new(watcher));
        {
            let mut w = watcher.lock().expect("lock");
            if let Some(parent) = &parent
                && let Err(e) = w.watch(parent, RecursiveMode::NonRecursive)
            {
                debug!(path = %parent.display(), error = %e, "not watching the folder's parent");
            }
            // A missing folder is watched once it appears (through its parent).
            if let Err(e) = w.watch(&folder, RecursiveMode::NonRecursive) {
                debug!(path = %folder.display(), error = %e, "folder not watched yet");
            }
        }
        let rewatch = Arc::downgrade(&watcher);
        let settled_only = Arc::new(AtomicBool::new(false));
        let timed_out = settled_only.clone();
        tokio::spawn(async move {
            loop {
                let first = match raw_rx.recv().await {
                    Some(raw) => raw,
                    None => return,
                };
                let mut rewatch_folder = first == Raw::Rewatch;
                let mut by_timeout = false;
                if first == Raw::Settling {
                    // Read once it is closed (`Now`), or after SETTLE.
                    loop {
                        match tokio::time::timeout(SETTLE, raw_rx.recv()).await {
                            Ok(Some(Raw::Settling)) => continue,
                            Ok(Some(raw)) => {
                                rewatch_folder |= raw == Raw::Rewatch;
                                break;
                            }
                            Ok(None) => return,
                            Err(_) => {
                                by_timeout = true;
                                break;
                            }
                        }
                    }
                }
                timed_out.store(by_timeout, Ordering::Relaxed);
                while let Ok(raw) = raw_rx.try_recv() {
                    rewatch_folder |= raw == Raw::Rewatch;
                }
                if rewatch_folder && let Some(w) = rewatch.upgrade() {
                    let mut w = w.lock().expect("lock");
                    let _ = w.unwatch(&folder);
                    if let Err(e) = w.watch(&folder, RecursiveMode::NonRecursive) {
                        debug!(path = %folder.display(), error = %e, "folder not watched (gone)");
                    }
                }
                if changed.send(()).await.is_err() {
                    return;
                }
            }
        });
        Ok(Self { _watcher: watcher, settled_only })
    }
}

/// What an event means for the manifests in `dir` (or the one `file`).
fn classify(event: &notify::Event, file: Option<&Path>, dir: &Path) -> Option<Raw> {
    // Reading the folder (each refresh lists it) is an access to it: a sync
    // must not trigger the next one.
    if let EventKind::Access(access) = event.kind
        && access != AccessKind::Close(AccessMode::Write)
    {
        return None;
    }
    let touches_dir = event.paths.iter().any(|p| p == dir);
    if touches_dir && file.is_none() {
        return Some(Raw::Rewatch);
    }
    let ours = |p: &PathBuf| {
        if p.parent() != Some(dir) {
            return false;
        }
        match file {
            Some(f) => p == f,
            // A ConfigMap volume: `..data` and the timestamped folders.
            None => is_manifest(p) || p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("..")),
        }
    };
    if !event.paths.iter().any(ours) {
        return None;
    }
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Modify(ModifyKind::Name(_))
        | EventKind::Remove(_) => Some(Raw::Now),
        EventKind::Create(_) if !event.paths.iter().any(|p| is_manifest(p)) => Some(Raw::Now),
        _ => Some(Raw::Settling),
    }
}

#[cfg(test)]
mod tests {
    use notify::{Event, EventKind, event::AccessKind};

    use super::*;

    #[test]
    fn reading_the_folder_is_no_change() {
        let dir = Path::new("/etc/lb/manifests");
        for access in
            [AccessKind::Open(AccessMode::Any), AccessKind::Read, AccessKind::Close(AccessMode::Read)]
        {
            let event = Event::new(EventKind::Access(access)).add_path(dir.to_path_buf());
            assert_eq!(classify(&event, None, dir), None, "{access:?} of the folder");
            let file = Event::new(EventKind::Access(access)).add_path(dir.join("web.yaml"));
            assert_eq!(classify(&file, None, dir), None, "{access:?} of a file");
        }
        let written = Event::new(EventKind::Access(AccessKind::Close(AccessMode::Write)))
            .add_path(dir.join("web.yaml"));
        assert_eq!(classify(&written, None, dir), Some(Raw::Now));
        let renamed = Event::new(EventKind::Modify(ModifyKind::Name(notify::event::RenameMode::Any)))
            .add_path(dir.to_path_buf());
        assert_eq!(classify(&renamed, None, dir), Some(Raw::Rewatch));
    }
}
