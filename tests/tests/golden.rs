//! kube-proxy semantics by golden files: each `testdata/<case>/` holds
//! manifests and `expected.txt`, the readable dump of the desired dataplane
//! state for node `node-1` (192.0.2.11, zone-a). No root needed.
//!
//! After an intended change of semantics, regenerate with
//! `LB_UPDATE_GOLDEN=1 cargo test -p lb-tests --test golden` and review the diff.

use std::{fmt::Write as _, path::Path};

use lb_userspace::{
    model::{ClusterState, Model, NodeInfo, desired_state},
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

/// The agent's `Model` re-derives only what changed: fed every case in turn
/// (and back again), then each case with one slice changed, it must agree
/// with a fresh derivation every time.
#[test]
fn the_incremental_model_agrees_with_a_fresh_derivation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut cases: Vec<_> = std::fs::read_dir(&root).expect("testdata").map(|e| e.unwrap().path()).collect();
    cases.sort();
    let states: Vec<ClusterState> =
        cases.iter().map(|c| manifests::load(&c.join("manifests")).state).collect();
    let mut model = Model::default();
    let mut other_node = node();
    other_node.name = "node-2".into();
    let rounds = states.iter().chain(states.iter().rev()).enumerate();
    for (i, state) in rounds {
        // Now and then the node changes too, which invalidates everything.
        let node = if i % 7 == 3 { other_node.clone() } else { node() };
        assert_eq!(*model.desired(state, &node), desired_state(state, &node), "round {i}");
        // The same state with each slice's endpoints cut by one: a change
        // the model must notice though the service is untouched.
        let mut edited = state.clone();
        for slice in edited.slices.values_mut() {
            std::sync::Arc::make_mut(slice).endpoints.pop();
        }
        assert_eq!(*model.desired(&edited, &node), desired_state(&edited, &node), "round {i}, edited");
    }
}

/// A frontend two Services ask for moves to the other when its holder goes,
/// and back when it returns, without anything else changing.
#[test]
fn a_contested_frontend_changes_hands_incrementally() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/22-conflicting-external-ip/manifests");
    let both = manifests::load(&root).state;
    let mut second_only = both.clone();
    second_only.services.remove("default/first");
    let external = lb_common::FrontendKey::new([203, 0, 113, 31], 80, lb_common::IPPROTO_TCP);
    let mut model = Model::default();
    let holder = |d: &lb_userspace::model::Desired| d.frontends.get(&external).map(|f| f.service.clone());
    let d = model.desired(&both, &node()).clone();
    assert_eq!(holder(&d).as_deref(), Some("default/first"));
    assert_eq!(d.notes.len(), 1, "{:?}", d.notes);
    let d = model.desired(&second_only, &node()).clone();
    assert_eq!(holder(&d).as_deref(), Some("default/second"));
    assert!(d.notes.is_empty(), "{:?}", d.notes);
    assert_eq!(d, desired_state(&second_only, &node()));
    let d = model.desired(&both, &node()).clone();
    assert_eq!(holder(&d).as_deref(), Some("default/first"));
    assert_eq!(d, desired_state(&both, &node()));
}
