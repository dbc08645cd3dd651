//! The desired state as text: golden files and `--dry-run`.

use std::fmt::Write as _;

use super::Desired;

impl Desired {
    /// A stable, human-readable dump.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for (key, fe) in &self.frontends {
            let _ = write!(out, "{key} {} {}", fe.kind.as_str(), printable(&fe.service));
            if !fe.port_name.is_empty() {
                let _ = write!(out, " port={}", printable(&fe.port_name));
            }
            if let Some(t) = fe.affinity_timeout {
                let _ = write!(out, " affinity=ClientIP/{t}s");
            }
            if fe.local_only {
                let _ = write!(out, " local-only");
            }
            if fe.two_scopes {
                let _ = write!(out, " in-cluster-clients=internal");
            }
            if !fe.source_ranges.is_empty() {
                let ranges: Vec<String> = fe.source_ranges.iter().map(|r| r.to_string()).collect();
                let _ = write!(out, " source-ranges={}", ranges.join(","));
            }
            out.push('\n');
            if fe.backends.is_empty() {
                let action = if fe.local_only { "drop" } else { "reject" };
                let _ = writeln!(out, "  (no endpoints: {action})");
            }
            for b in &fe.backends {
                let _ = writeln!(out, "  -> {}:{}{}", b.addr, b.port, if b.local { " local" } else { "" });
            }
            for b in &fe.standby {
                let _ = writeln!(out, "  .. {}:{} (existing flows only)", b.addr, b.port);
            }
        }
        for (port, hc) in &self.health_checks {
            let _ = writeln!(
                out,
                "healthCheckNodePort {port} {}/{}: {} local endpoint(s)",
                printable(&hc.namespace),
                printable(&hc.name),
                hc.local_endpoints
            );
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {}: {}", printable(&n.object), printable(&n.message));
        }
        out
    }
}

/// `s` with control characters escaped: names from manifests cannot forge
/// lines of a log or a dump.
pub fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn control_characters_in_names_are_escaped() {
        assert_eq!(printable("default/web"), "default/web");
        assert_eq!(printable("web\nWARN forged line"), "web\\nWARN forged line");
        assert_eq!(printable("a\tb\u{1b}[31m"), "a\\tb\\u{1b}[31m");
    }
}
