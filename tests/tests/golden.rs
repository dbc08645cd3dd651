//! kube-proxy semantics by golden files: each `testdata/<case>/` holds
//! manifests and `expected.txt`: the readable dump of the desired dataplane
//! state for node `node-1` (192.0.2.11, zone-a; a case's `node-zone` file
//! names another zone, or none when empty), then the maps the reconciler
//! programs for it. `testdata/scripts/*.txtar` replay what an
//! agent lives through (syncs, stops, edits while stopped, restarts) on
//! in-memory maps, checking the maps after each step. No root needed.
//!
//! After an intended change of semantics, regenerate with
//! `LB_UPDATE_GOLDEN=1 cargo test -p lb-tests --test golden` and review the diff.

use std::{fmt::Write as _, net::IpAddr, path::Path};

use lb_userspace::{
    dataplane::Dataplane,
    model::{ClusterState, Model, NodeInfo, desired_state},
    reconciler::{self, MapStore as _, MemoryStore, NodeSettings, Reconciler},
    sources::manifests,
};

fn node() -> NodeInfo {
    NodeInfo {
        name: "node-1".into(),
        zone: Some("zone-a".into()),
        addresses: vec![[192, 0, 2, 11].into()],
        ..Default::default()
    }
}

fn settings() -> NodeSettings {
    let addr = IpAddr::from([192, 0, 2, 11]);
    NodeSettings {
        addresses: [addr].into(),
        snat_addr: addr,
        nat_ports: (61000, 65535),
        via_stack: false,
        service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
    }
}

fn errors(loaded: &[manifests::ManifestError]) -> String {
    let mut out = String::new();
    for e in loaded {
        let file = e.file.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let _ = match &e.object {
            Some(o) => writeln!(out, "error: {file}: {o}: {}", e.reason),
            None => writeln!(out, "error: {file}: {}", e.reason),
        };
    }
    out
}

fn render(case: &Path) -> String {
    let loaded = manifests::load(&case.join("manifests")).expect("the case's manifests folder");
    let mut node = node();
    if let Ok(zone) = std::fs::read_to_string(case.join("node-zone")) {
        node.zone = Some(zone.trim().to_string()).filter(|z| !z.is_empty());
    }
    let desired = desired_state(&loaded.state, &node);
    let mut out = desired.dump();
    out.push_str(&errors(&loaded.errors));
    let mut store = MemoryStore::default();
    let ops = Reconciler::new().plan(&desired, &settings()).expect("plan");
    reconciler::apply(&mut store, &ops).expect("apply");
    out.push_str("--- maps ---\n");
    out.push_str(&store.dump().expect("dump").dump());
    out
}

#[test]
fn golden_cases() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut cases = case_dirs(&root);
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
    let mut cases = case_dirs(&root);
    cases.sort();
    let states: Vec<ClusterState> =
        cases.iter().map(|c| manifests::load(&c.join("manifests")).unwrap().state).collect();
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
    let both = manifests::load(&root).unwrap().state;
    let mut second_only = both.clone();
    second_only.services.remove("default/first");
    let external = lb_userspace::frontend::Frontend::new([203, 0, 113, 31], 80, lb_common::L4::Tcp);
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

/// The manifest cases (not the scripts).
fn case_dirs(root: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(root)
        .expect("testdata")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("manifests").is_dir())
        .collect()
}

/// A txtar script: commands first, then `-- name --` sections (manifest
/// files and expected dumps).
struct Script {
    commands: Vec<(usize, String)>,
    sections: Vec<(String, String)>,
}

fn parse_script(text: &str) -> Script {
    let mut commands = Vec::new();
    let mut sections: Vec<(String, String)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(name) = line.strip_prefix("-- ").and_then(|l| l.strip_suffix(" --")) {
            sections.push((name.to_string(), String::new()));
        } else if let Some((_, body)) = sections.last_mut() {
            body.push_str(line);
            body.push('\n');
        } else if !line.trim().is_empty() && !line.starts_with('#') {
            commands.push((i + 1, line.trim().to_string()));
        }
    }
    Script { commands, sections }
}

fn write_script(text: &str, script: &Script) -> String {
    let head: Vec<&str> = text.lines().take_while(|l| !l.starts_with("-- ")).collect();
    let mut out = head.join("\n");
    out.push('\n');
    for (name, body) in &script.sections {
        let _ = write!(out, "-- {name} --\n{body}");
    }
    out
}

/// Runs one script; returns what differs from its expected dumps.
fn run_script(path: &Path, update: bool) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut script = parse_script(&text);
    let dir = std::env::temp_dir().join(format!(
        "lb-golden-{}-{}",
        std::process::id(),
        path.file_stem().unwrap().to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut folder = manifests::Folder::new(&dir);
    // The maps outlive the agent, as pinned maps do.
    let mut maps = Some(MemoryStore::default());
    let mut agent: Option<Dataplane<MemoryStore>> = None;
    let mut last_writes = None;
    let mut failures = Vec::new();
    let section = |script: &Script, name: &str| {
        script
            .sections
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{}: no section {name}", path.display()))
    };
    for (line, command) in script.commands.clone() {
        let at = format!("{}:{line}: {command}", path.file_name().unwrap().to_string_lossy());
        let words: Vec<&str> = command.split_whitespace().collect();
        match words.as_slice() {
            // `write FILE [SECTION]`: the section of that name (or FILE's).
            ["write", file] | ["write", file, _] => {
                let i = section(&script, words.get(2).unwrap_or(file));
                std::fs::write(dir.join(file), &script.sections[i].1).unwrap();
            }
            ["delete", file] => std::fs::remove_file(dir.join(file)).unwrap(),
            ["start"] => {
                assert!(agent.is_none(), "{at}: already running");
                agent = Some(Dataplane::adopt(maps.take().expect("maps")).expect("adopt"));
            }
            ["stop"] => maps = Some(agent.take().unwrap_or_else(|| panic!("{at}: not running")).store),
            ["sync"] => {
                let dp = agent.as_mut().unwrap_or_else(|| panic!("{at}: not running"));
                let (state, errors) = folder.refresh();
                assert!(errors.is_empty(), "{at}: {errors:?}");
                last_writes = Some(dp.sync(state, &node(), &settings()).expect("sync"));
            }
            ["writes", n] => {
                let n: usize = n.parse().unwrap();
                if last_writes != Some(n) {
                    failures.push(format!("{at}: the last sync wrote {last_writes:?} entries"));
                }
            }
            ["dump", name] => {
                let store = agent.as_ref().map(|a| &a.store).or(maps.as_ref()).unwrap();
                let got = store.dump().unwrap().dump();
                let i = section(&script, name);
                if update {
                    script.sections[i].1 = got;
                } else if script.sections[i].1 != got {
                    failures.push(format!("{at}:\nexpected:\n{}\ngot:\n{got}", script.sections[i].1));
                }
            }
            _ => panic!("{at}: unknown command"),
        }
    }
    if update {
        std::fs::write(path, write_script(&text, &script)).unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
    failures
}

#[test]
fn golden_scripts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/scripts");
    let mut scripts: Vec<_> =
        std::fs::read_dir(&root).expect("testdata/scripts").map(|e| e.unwrap().path()).collect();
    scripts.sort();
    assert!(scripts.len() >= 3, "only {} scripts", scripts.len());
    let update = std::env::var_os("LB_UPDATE_GOLDEN").is_some();
    let failures: Vec<String> = scripts.iter().flat_map(|s| run_script(s, update)).collect();
    assert!(failures.is_empty(), "{} script step(s) differ:\n{}", failures.len(), failures.join("\n"));
}
