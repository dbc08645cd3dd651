//! Manifest fuzzing: every golden case's manifests, truncated at every
//! offset and mutated at random (bytes flipped, inserted or cut, values
//! replaced by hostile ones, documents repeated, deep nesting), loaded from
//! a folder beside a good file. Whatever the damage: loading never fails or
//! panics, every error names the damaged file, the good file's Service is
//! still there, and the model's result always plans onto the maps. No root
//! needed.

use std::path::{Path, PathBuf};

use lb_userspace::{
    model::{NodeInfo, desired_state},
    reconciler::{NodeSettings, Reconciler},
    sources::manifests,
};
use proptest::prelude::*;

const GOOD: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: anchor, namespace: fuzz}\n\
    spec: {clusterIP: 10.96.255.1, ports: [{port: 80, targetPort: 8080}]}\n---\n\
    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
    metadata: {name: anchor-1, namespace: fuzz, labels: {kubernetes.io/service-name: anchor}}\n\
    addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [\"10.244.9.9\"]}]\n";

/// Values an attacker or a typo puts where a field's value goes.
const HOSTILE: &[&str] = &[
    "-1",
    "0",
    "65536",
    "4294967296",
    "\"\"",
    "null",
    "[]",
    "{}",
    "0.0.0.0",
    "::",
    "255.255.255.255",
    "\"a\\nb\"",
    "~",
    "*a",
    "&a x",
    "!!binary AAAA",
    "1e309",
    "NaN",
    "true",
    "\"\\u0000\"",
    "- x",
    ": :",
    "'",
    "\"",
    "[[[[[[[[",
    "{a: {b: {c:",
];

fn corpus() -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut files = Vec::new();
    for case in std::fs::read_dir(&root).unwrap().flatten() {
        let Ok(entries) = std::fs::read_dir(case.path().join("manifests")) else { continue };
        for f in entries.flatten() {
            let name = format!("{}/{}", case.file_name().to_string_lossy(), f.file_name().to_string_lossy());
            files.push((name, std::fs::read(f.path()).unwrap()));
        }
    }
    files.sort();
    assert!(files.len() >= 30, "only {} corpus files", files.len());
    files
}

struct Folder(PathBuf);

impl Folder {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lb-manfuzz-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Sorted first: on a clash the good file's definition wins.
        std::fs::write(dir.join("00-good.yaml"), GOOD).unwrap();
        Self(dir)
    }

    /// Loads the folder with `damaged` as its second file and checks the
    /// invariants; `Err` describes a violation.
    fn check(&self, damaged: &[u8]) -> Result<(), String> {
        let path = self.0.join("50-damaged.yaml");
        std::fs::write(&path, damaged).unwrap();
        let loaded = manifests::load(&self.0).map_err(|e| format!("load failed: {e:#}"))?;
        if let Some(e) = loaded.errors.iter().find(|e| e.file != path) {
            return Err(format!("an error names another file: {e}"));
        }
        if !loaded.state.services.contains_key("fuzz/anchor") {
            return Err("the good file's Service is gone".into());
        }
        let node =
            NodeInfo { name: "node-1".into(), addresses: vec![[192, 0, 2, 11].into()], ..Default::default() };
        let desired = desired_state(&loaded.state, &node);
        let anchor = desired
            .frontends
            .iter()
            .find(|(_, fe)| fe.service == "fuzz/anchor")
            .ok_or("the good Service has no frontend")?;
        if anchor.1.backends.len() != 1 {
            return Err(format!("the good Service has {} backends", anchor.1.backends.len()));
        }
        let addr = [192, 0, 2, 11].into();
        let settings = NodeSettings {
            addresses: [addr].into(),
            snat_addr: addr,
            nat_ports: (61000, 65535),
            via_stack: false,
            service_cidrs: Vec::new(),
        };
        Reconciler::new()
            .plan(&desired, &settings)
            .map_err(|e| format!("the model's state does not plan: {e:#}"))?;
        Ok(())
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn truncated_at_every_offset() {
    let folder = Folder::new("trunc");
    let corpus = corpus();
    // The richest files in full; a stride through the rest keeps it quick.
    for (i, (name, text)) in corpus.iter().enumerate() {
        let stride = if i % 8 == 0 { 1 } else { 13 };
        for cut in (0..text.len()).step_by(stride) {
            if let Err(e) = folder.check(&text[..cut]) {
                panic!(
                    "{name} cut at byte {cut}: {e}\n--- file ---\n{}",
                    String::from_utf8_lossy(&text[..cut])
                );
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Damage {
    Flip {
        at: usize,
        bit: u8,
    },
    Insert {
        at: usize,
        byte: u8,
    },
    Cut {
        at: usize,
        len: usize,
    },
    /// A value after a `: ` replaced by a hostile one.
    Value {
        nth: usize,
        hostile: usize,
    },
    RepeatDocument {
        nth: usize,
    },
    Nest {
        depth: usize,
    },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Damage::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Damage::Insert { at, byte }),
        (any::<usize>(), 1usize..40).prop_map(|(at, len)| Damage::Cut { at, len }),
        (any::<usize>(), 0..HOSTILE.len()).prop_map(|(nth, hostile)| Damage::Value { nth, hostile }),
        (any::<usize>(), 0..HOSTILE.len()).prop_map(|(nth, hostile)| Damage::Value { nth, hostile }),
        any::<usize>().prop_map(|nth| Damage::RepeatDocument { nth }),
        (1usize..2000).prop_map(|depth| Damage::Nest { depth }),
    ]
}

fn apply(text: &mut Vec<u8>, d: &Damage) {
    let len = text.len().max(1);
    match *d {
        Damage::Flip { at, bit } => {
            if let Some(b) = text.get_mut(at % len) {
                *b ^= 1 << bit;
            }
        }
        Damage::Insert { at, byte } => text.insert((at % len).min(text.len()), byte),
        Damage::Cut { at, len: n } => {
            let start = (at % len).min(text.len());
            text.drain(start..(start + n).min(text.len()));
        }
        Damage::Value { nth, hostile } => {
            let s = String::from_utf8_lossy(text).into_owned();
            let spots: Vec<usize> = s.match_indices(": ").map(|(i, _)| i + 2).collect();
            if spots.is_empty() {
                return;
            }
            let start = spots[nth % spots.len()];
            let end = s[start..].find(['\n', ',', '}', ']']).map_or(s.len(), |e| start + e);
            *text = format!("{}{}{}", &s[..start], HOSTILE[hostile], &s[end..]).into_bytes();
        }
        Damage::RepeatDocument { nth } => {
            let s = String::from_utf8_lossy(text).into_owned();
            let docs: Vec<&str> = s.split("\n---\n").collect();
            let doc = docs[nth % docs.len()];
            *text = format!("{s}\n---\n{doc}\n").into_bytes();
        }
        Damage::Nest { depth } => {
            let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            text.extend_from_slice(
                format!("\n---\napiVersion: v1\nkind: Service\nmetadata: {nested}\n").as_bytes(),
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_manifests_never_take_the_good_ones_down(
        file in any::<prop::sample::Index>(),
        damages in prop::collection::vec(damage(), 1..5),
    ) {
        thread_local! {
            static FIXTURE: (Folder, Vec<(String, Vec<u8>)>) =
                (Folder::new(&format!("{:?}", std::thread::current().id()).replace(['(', ')'], "")), corpus());
        }
        FIXTURE.with(|(folder, corpus)| {
            let (name, text) = &corpus[file.index(corpus.len())];
            let mut text = text.clone();
            for d in &damages {
                apply(&mut text, d);
            }
            if let Err(e) = folder.check(&text) {
                panic!("{name} after {damages:?}: {e}\n--- file ---\n{}", String::from_utf8_lossy(&text));
            }
        });
    }
}
