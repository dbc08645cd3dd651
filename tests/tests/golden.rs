//! kube-proxy semantics by golden files: each `testdata/<case>/` holds
//! manifests and `expected.txt`, the readable dump of the desired dataplane
//! state for node `node-1` (192.0.2.11, zone-a). No root needed.
//!
//! After an intended change of semantics, regenerate with
//! `LB_UPDATE_GOLDEN=1 cargo test -p lb-tests --test golden` and review the diff.

use std::{fmt::Write as _, path::Path};

use lb_userspace::{
    model::{NodeInfo, desired_state},
    sources::manifests,
};

fn node() -> NodeInfo {
    NodeInfo { name: "node-1".into(), zone: Some("zone-a".into()), addresses: vec![[192, 0, 2, 11].into()] }
}

fn render(case: &Path) -> String {
    let loaded = manifests::load(&case.join("manifests"));
    let mut out = desired_state(&loaded.state, &node()).dump();
    for e in &loaded.errors {
        let file = e.file.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let _ = match &e.object {
            Some(o) => writeln!(out, "error: {file}: {o}: {}", e.reason),
            None => writeln!(out, "error: {file}: {}", e.reason),
        };
    }
    out
}

#[test]
fn golden_cases() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut cases: Vec<_> = std::fs::read_dir(&root).expect("testdata").map(|e| e.unwrap().path()).collect();
    cases.sort();
    assert!(cases.len() >= 30, "only {} golden cases", cases.len());
    let update = std::env::var_os("LB_UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for case in &cases {
        let got = render(case);
        let expected_path = case.join("expected.txt");
        if update {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("{} has no expected.txt", case.display()));
        if got != expected {
            failures.push(format!(
                "--- {}\nexpected:\n{expected}\ngot:\n{got}",
                case.file_name().unwrap().to_string_lossy()
            ));
        }
    }
    assert!(failures.is_empty(), "{} golden case(s) differ:\n{}", failures.len(), failures.join("\n"));
}
