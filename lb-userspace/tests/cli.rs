//! `lb-agent run --dry-run`, as an operator checks a folder before rolling
//! it out: no kernel, no root.

use std::{path::PathBuf, process::Command};

fn dry_run(folder: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lb-agent"))
        .args(["run", "--dry-run", "--node-name", "node-1", "--node-address", "192.0.2.11", "--manifests"])
        .arg(folder)
        .output()
        .expect("lb-agent runs")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lb-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_missing_folder_fails_with_its_name() {
    let missing = std::env::temp_dir().join(format!("lb-cli-{}-nowhere", std::process::id()));
    let out = dry_run(&missing);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit status {:?}, stderr: {stderr}", out.status);
    assert!(stderr.contains(&*missing.to_string_lossy()), "the error names the folder: {stderr}");
    assert!(out.stdout.is_empty(), "no state is printed: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn a_bad_manifest_is_reported_and_the_rest_is_shown() {
    let dir = scratch("bad");
    std::fs::write(
        dir.join("good.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n",
    )
    .unwrap();
    std::fs::write(dir.join("broken.yaml"), "apiVersion: v1\nkind: Service\nmetadata: [\n").unwrap();
    let out = dry_run(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "a readable folder is a dry run's success: {:?}", out.status);
    assert!(stdout.contains("10.96.0.10:80/TCP ClusterIP default/web"), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("error: ") && l.contains("broken.yaml")), "{stdout}");
}

#[test]
fn an_api_server_that_is_no_url_is_refused_before_anything_runs() {
    let out = Command::new(env!("CARGO_BIN_EXE_lb-agent"))
        .args(["run", "--kubernetes", "--node-name", "node-1", "--external-interface", "eth0"])
        .args(["--api-server", "192.0.2.10"])
        .output()
        .expect("lb-agent runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--api-server") && stderr.contains("https://"), "{stderr}");
}
