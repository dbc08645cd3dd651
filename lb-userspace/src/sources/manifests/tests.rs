use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use super::*;

static N: AtomicU32 = AtomicU32::new(0);

/// A fresh folder under the temp dir, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!(
            "lb-man-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.0.join(name), text).unwrap();
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_dir_all(self.0.with_extension("gone"));
    }
}

fn service(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{port: 80}}]\nendpoints: [{{addresses: [\"10.244.1.5\"]}}]\n"
    )
}

fn cluster_ip(folder: &Folder, name: &str) -> Option<String> {
    folder.state.services.get(&format!("default/{name}"))?.spec.as_ref()?.cluster_ip.clone()
}

#[test]
fn a_folder_that_cannot_be_listed_keeps_its_last_state() {
    let dir = Dir::new();
    dir.write("web.yaml", &service("web", "10.96.0.10"));
    let mut folder = Folder::new(&dir.0);
    assert!(folder.refresh().1.is_empty());
    // The mount goes away (or the folder is replaced, or its permissions change).
    std::fs::rename(&dir.0, dir.0.with_extension("gone")).unwrap();
    let (state, errors) = folder.refresh();
    assert_eq!(state.services.len(), 1, "the last good state is kept");
    assert!(
        errors.iter().any(|e| e.reason.contains("cannot list manifests") && e.reason.contains("keeping")),
        "{errors:?}"
    );
    assert!(folder.retry_soon(), "and read again soon");
    std::fs::rename(dir.0.with_extension("gone"), &dir.0).unwrap();
    assert!(folder.refresh().1.is_empty());
    assert_eq!(cluster_ip(&folder, "web").as_deref(), Some("10.96.0.10"));
}

#[test]
fn an_object_two_files_define_comes_from_the_first_and_outlives_its_removal() {
    let dir = Dir::new();
    dir.write("a.yaml", &service("web", "10.96.0.10"));
    dir.write("b.yaml", &service("web", "10.96.0.99"));
    let mut folder = Folder::new(&dir.0);
    let errors = folder.refresh().1;
    assert_eq!(cluster_ip(&folder, "web").as_deref(), Some("10.96.0.10"));
    let clash: Vec<_> = errors.iter().filter(|e| e.reason.contains("also defined in")).collect();
    assert_eq!(clash.len(), 2, "the Service and its slice: {errors:?}");
    assert!(clash.iter().all(|e| e.file.ends_with("b.yaml") && e.reason.contains("a.yaml")), "{clash:?}");
    std::fs::remove_file(dir.0.join("a.yaml")).unwrap();
    let errors = folder.refresh().1;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(cluster_ip(&folder, "web").as_deref(), Some("10.96.0.99"), "b.yaml's definition remains");
    assert_eq!(folder.state.slices.len(), 1);
}

#[test]
fn a_file_that_does_not_parse_to_its_end_keeps_what_it_held() {
    let dir = Dir::new();
    let text = service("web", "10.96.0.10");
    dir.write("web.yaml", &text);
    let mut folder = Folder::new(&dir.0);
    folder.refresh();
    // Rewritten in place and read half way: cut inside a flow mapping.
    let cut = text.find("endpoints: [{addresses").unwrap() + 14;
    dir.write("web.yaml", &text[..cut]);
    let errors = folder.refresh().1;
    assert_eq!(folder.state.slices.len(), 1, "the slice it held stays");
    assert!(errors.iter().any(|e| e.reason.contains("keeping the 2 objects")), "{errors:?}");
    dir.write("web.yaml", &service("web", "10.96.0.11"));
    assert!(folder.refresh().1.is_empty());
    assert_eq!(cluster_ip(&folder, "web").as_deref(), Some("10.96.0.11"));
}

#[test]
fn a_file_written_just_now_waits_when_no_writer_is_known_done() {
    let dir = Dir::new();
    let mut folder = Folder::new(&dir.0);
    dir.write("web.yaml", &service("web", "10.96.0.10"));
    folder.refresh_wary();
    assert!(folder.state.services.is_empty() && folder.retry_soon(), "read before it settled");
    std::thread::sleep(SETTLED + Duration::from_millis(20));
    folder.refresh_wary();
    assert_eq!(folder.state.services.len(), 1);
    assert!(!folder.retry_soon());
}

#[test]
fn big_files_fifos_and_symlink_loops_are_reported_and_never_read() {
    let dir = Dir::new();
    dir.write("web.yaml", &service("web", "10.96.0.10"));
    let big: Vec<String> = (0..10).map(|i| service(&format!("big-{i}"), "10.96.0.11")).collect();
    dir.write("big.yaml", &big.join("---\n"));
    nix::unistd::mkfifo(&dir.0.join("pipe.yaml"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::os::unix::fs::symlink(dir.0.join("b.yaml"), dir.0.join("a.yaml")).unwrap();
    std::os::unix::fs::symlink(dir.0.join("a.yaml"), dir.0.join("b.yaml")).unwrap();
    let mut folder = Folder::with_limits(&dir.0, Limits { max_file_bytes: 2048 });
    let errors = folder.refresh().1;
    let about = |name: &str| errors.iter().find(|e| e.file.ends_with(name)).map(|e| e.reason.clone());
    assert!(about("big.yaml").is_some_and(|r| r.contains("more than the limit of 2048")), "{errors:?}");
    assert!(about("pipe.yaml").is_some_and(|r| r.contains("not a regular file")), "{errors:?}");
    assert!(about("a.yaml").is_some_and(|r| r.contains("cannot read")), "{errors:?}");
    assert_eq!(folder.state.services.keys().collect::<Vec<_>>(), ["default/web"], "the rest is read");
}

#[test]
fn kinds_the_api_server_would_not_know_are_reported() {
    let mut loaded = Loaded::default();
    let text = "apiVersion: v1\nkind: Servcie\nmetadata: {name: web}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\n\
                apiVersion: cert-manager.io/v1\nkind: Certificate\nmetadata: {name: c}\n";
    assert!(parse_into(Path::new("x.yaml"), text, &mut loaded));
    assert_eq!(loaded.errors.len(), 1, "{:?}", loaded.errors);
    assert!(loaded.errors[0].reason.contains("unknown kind \"Servcie\""), "{:?}", loaded.errors);
}

/// Waits up to a second for a signal from the watch.
async fn signalled(rx: &mut tokio::sync::mpsc::Receiver<()>) -> bool {
    tokio::time::timeout(Duration::from_secs(1), rx.recv()).await.is_ok_and(|s| s.is_some())
}

async fn drain(rx: &mut tokio::sync::mpsc::Receiver<()>) {
    tokio::time::sleep(Duration::from_millis(120)).await;
    while rx.try_recv().is_ok() {}
}

/// The layout a kubelet gives a ConfigMap volume: manifests are links into
/// `..data`, itself a link to a timestamped folder, swapped by a rename.
#[tokio::test]
async fn a_configmap_volume_update_is_followed() {
    let dir = Dir::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let version = |n: u32, ip: &str| {
        let v = dir.0.join(format!("..2026_12_01_0{n}"));
        std::fs::create_dir(&v).unwrap();
        std::fs::write(v.join("web.yaml"), service("web", ip)).unwrap();
        v
    };
    let v1 = version(1, "10.96.0.10");
    std::os::unix::fs::symlink(v1.file_name().unwrap(), dir.0.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/web.yaml", dir.0.join("web.yaml")).unwrap();
    let _watch = Watch::start(&dir.0, tx).unwrap();
    let mut folder = Folder::new(&dir.0);
    folder.refresh();
    assert_eq!(cluster_ip(&folder, "web").as_deref(), Some("10.96.0.10"));
    drain(&mut rx).await;
    let v2 = version(2, "10.96.0.20");
    std::os::unix::fs::symlink(v2.file_name().unwrap(), dir.0.join("..data_tmp")).unwrap();
    std::fs::rename(dir.0.join("..data_tmp"), dir.0.join("..data")).unwrap();
    assert!(signalled(&mut rx).await, "the swap of ..data is a change");
    folder.refresh();
    assert_eq!(cluster_ip(&folder, "web").as_deref(), Some("10.96.0.20"));
}

#[tokio::test]
async fn a_folder_replaced_or_created_later_is_followed() {
    let parent = Dir::new();
    let dir = parent.0.join("manifests");
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let _watch = Watch::start(&dir, tx).unwrap();
    // Created after the start.
    std::fs::create_dir(&dir).unwrap();
    assert!(signalled(&mut rx).await, "the folder appeared");
    drain(&mut rx).await;
    std::fs::write(dir.join("web.yaml"), service("web", "10.96.0.10")).unwrap();
    assert!(signalled(&mut rx).await, "a manifest in the new folder");
    drain(&mut rx).await;
    // Replaced by a rename.
    let next = parent.0.join("next");
    std::fs::create_dir(&next).unwrap();
    std::fs::write(next.join("web.yaml"), service("web", "10.96.0.20")).unwrap();
    std::fs::rename(&dir, parent.0.join("old")).unwrap();
    std::fs::rename(&next, &dir).unwrap();
    assert!(signalled(&mut rx).await, "the folder was replaced");
    drain(&mut rx).await;
    std::fs::write(dir.join("api.yaml"), service("api", "10.96.0.30")).unwrap();
    assert!(signalled(&mut rx).await, "a manifest in the replacing folder");
}
