//! `tests/E2E-PARITY.md` names real tests: every `P`, `S`, `H`, `K` test
//! it cites is a test function of that file, every `G` case a golden case
//! directory, and every row says how it stands. No root needed.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_test_the_parity_table_cites_exists() {
    let table = std::fs::read_to_string(root().join("E2E-PARITY.md")).unwrap();
    let files = [("P", "parity.rs"), ("S", "scenarios.rs"), ("H", "host_clients.rs"), ("K", "packets.rs")];
    let sources: Vec<(&str, String)> = files
        .iter()
        .map(|(tag, file)| (*tag, std::fs::read_to_string(root().join("tests").join(file)).unwrap()))
        .collect();
    let mut cited = 0;
    for cite in table.split('`').skip(1).step_by(2) {
        let Some((tag, name)) = cite.split_once(' ') else { continue };
        if tag == "G" {
            assert!(root().join("testdata").join(name).join("expected.txt").exists(), "golden case {name}");
            cited += 1;
        } else if let Some((_, src)) = sources.iter().find(|(t, _)| *t == tag) {
            assert!(src.contains(&format!("fn {name}(")), "{tag} {name}: no such test");
            cited += 1;
        } else if tag == "kube_source.rs" {
            let src = std::fs::read_to_string(root().join("tests/kube_source.rs")).unwrap();
            assert!(src.contains(&format!("fn {name}(")), "kube_source.rs {name}: no such test");
            cited += 1;
        }
    }
    assert!(cited > 100, "{cited} citations");
    // Every row of a title table says how it stands.
    for line in table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| upstream") && !l.starts_with("| behaviour"))
    {
        let status = line.rsplit('|').nth(1).unwrap_or("").trim();
        assert!(
            ["covered", "in part", "n/a", "not yet"].iter().any(|s| status.starts_with(s)),
            "row without a status: {line}"
        );
    }
}
