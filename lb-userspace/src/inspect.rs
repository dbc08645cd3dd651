//! `lb-agent inspect`: the live dataplane read from the pinned maps, as a
//! table or JSON. Works whether or not the agent is running.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context as _, Result};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use lb_common::{Drop, FrontendKind, L4, SlotKey, ct_flags, ct_tcp, frontend_flags, registry};
use serde::Serialize;

use crate::{
    maps::Maps,
    reconciler::{MapStore as _, keys, store::frontend_flag_names},
};

#[derive(Serialize)]
pub struct ServiceRow {
    pub frontend: String,
    pub scope: &'static str,
    /// `namespace/name` of the Service, from `lb_svc_names`.
    pub service: Option<String>,
    pub port_name: Option<String>,
    pub kind: String,
    pub id: u32,
    pub flags: Vec<&'static str>,
    pub affinity_timeout: Option<u32>,
    pub backends: Vec<String>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

#[derive(Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub backend: String,
    pub proto: &'static str,
    pub local: bool,
}

#[derive(Serialize)]
pub struct ConntrackRow {
    pub direction: &'static str,
    pub tuple: String,
    pub rewrite: String,
    pub backend_id: u32,
    pub frontend_id: u32,
    pub tcp: String,
    pub idle_s: u64,
    pub expired: bool,
}

#[derive(Serialize)]
pub struct Stats {
    pub drops: BTreeMap<&'static str, u64>,
    pub events: BTreeMap<&'static str, u64>,
    pub services: Vec<ServiceRow>,
}

fn proto_name(p: u8) -> &'static str {
    L4::from_proto(p).map_or("?", L4::name)
}

pub fn services(maps: &Maps) -> Result<Vec<ServiceRow>> {
    let programmed = maps.dump()?;
    let mut rows = Vec::new();
    for (key, fe) in &programmed.services {
        let mut list = Vec::new();
        for slot in 0..fe.backend_count {
            let entry = match programmed.slots.get(&SlotKey { frontend_id: fe.id, slot }) {
                Some(id) => match programmed.backends.get(id) {
                    Some(b) => format!(
                        "{}:{}{}",
                        Ipv4Addr::from(b.addr),
                        b.port,
                        if b.flags & lb_common::backend_flags::LOCAL != 0 { " (local)" } else { "" }
                    ),
                    None => format!("#{id} (missing!)"),
                },
                None => format!("slot {slot} missing!"),
            };
            list.push(entry);
        }
        let stats = maps.svc_stats.get(&fe.id, 0).ok();
        let sum = |f: fn(&lb_common::SvcStats) -> u64| stats.as_ref().map_or(0, |s| s.iter().map(f).sum());
        let frontend = keys::frontend_of(key);
        let name = programmed.names.get(&fe.id);
        rows.push(ServiceRow {
            frontend: frontend.map_or_else(|| format!("{key:?}"), |f| f.address()),
            scope: frontend.map_or("?", |f| f.scope.name()),
            service: name.map(|n| format!("{}/{}", n.namespace(), n.name())),
            port_name: name.map(|n| n.port().to_string()).filter(|p| !p.is_empty()),
            kind: FrontendKind::from_u8(fe.kind).map_or("?", FrontendKind::as_str).to_string(),
            id: fe.id,
            flags: frontend_flag_names(fe.flags),
            affinity_timeout: (fe.flags & frontend_flags::AFFINITY != 0).then_some(fe.affinity_timeout),
            backends: list,
            packets: sum(|s| s.packets),
            bytes: sum(|s| s.bytes),
            new_flows: sum(|s| s.new_flows),
        });
    }
    Ok(rows)
}

#[derive(Serialize)]
pub struct MapRow {
    pub name: &'static str,
    #[serde(rename = "type")]
    pub map_type: &'static str,
    pub entries: Option<usize>,
    pub capacity: Option<u32>,
    pub pinned: bool,
    pub about: &'static str,
}

/// Every map of the registry: what it holds, how full it is.
pub fn maps(maps: &Maps) -> Vec<MapRow> {
    registry::MAPS
        .iter()
        .map(|m| MapRow {
            name: m.name,
            map_type: m.map_type.name(),
            entries: maps.entries(m),
            capacity: maps.capacity(m),
            pinned: m.pinned,
            about: m.about,
        })
        .collect()
}

pub fn backends(maps: &Maps) -> Result<Vec<BackendRow>> {
    let mut rows: Vec<BackendRow> = maps
        .backends
        .iter()
        .map(|r| {
            r.map(|(id, b)| BackendRow {
                id,
                backend: format!("{}:{}", Ipv4Addr::from(b.addr), b.port),
                proto: proto_name(b.proto),
                local: b.flags & lb_common::backend_flags::LOCAL != 0,
            })
        })
        .collect::<Result<_, _>>()?;
    rows.sort_by_key(|r| r.id);
    Ok(rows)
}

/// `CLOCK_MONOTONIC` now, the clock conntrack timestamps use.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

pub fn conntrack(maps: &Maps, limit: usize) -> Result<Vec<ConntrackRow>> {
    let now = monotonic_ns();
    let mut rows = Vec::new();
    for entry in maps.conntrack.iter().take(limit) {
        let (k, e) = entry?;
        let addr = |a: [u8; 4], p: u16| format!("{}:{p}", Ipv4Addr::from(a));
        let mut rewrite = Vec::new();
        if e.flags & ct_flags::REWRITE_SRC != 0 {
            rewrite.push(format!("src→{}", addr(e.nat_saddr, e.nat_sport)));
        }
        if e.flags & ct_flags::REWRITE_DST != 0 {
            rewrite.push(format!("dst→{}", addr(e.nat_daddr, e.nat_dport)));
        }
        let mut tcp = String::new();
        for (bit, c) in [(ct_tcp::SYN, 'S'), (ct_tcp::FIN, 'F'), (ct_tcp::RST, 'R')] {
            if e.tcp & bit != 0 {
                tcp.push(c);
            }
        }
        rows.push(ConntrackRow {
            direction: if e.is_reply() { "reply" } else { "request" },
            tuple: format!("{} {} → {}", proto_name(k.proto), addr(k.saddr, k.sport), addr(k.daddr, k.dport)),
            rewrite: rewrite.join(" "),
            backend_id: e.backend_id,
            frontend_id: e.frontend_id,
            tcp,
            idle_s: now.saturating_sub(e.last_seen) / 1_000_000_000,
            expired: e.expired(k.proto, now),
        });
    }
    Ok(rows)
}

pub fn drops(maps: &Maps) -> Result<BTreeMap<&'static str, u64>> {
    let mut out = BTreeMap::new();
    for reason in Drop::ALL {
        let total = maps.drops.get(&(reason as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
        out.insert(reason.as_str(), total);
    }
    Ok(out)
}

pub fn events(maps: &Maps) -> BTreeMap<&'static str, u64> {
    lb_common::Event::ALL
        .iter()
        .map(|e| (e.as_str(), maps.events.get(&(*e as u32), 0).map(|v| v.iter().sum()).unwrap_or(0)))
        .collect()
}

pub fn stats(maps: &Maps) -> Result<Stats> {
    Ok(Stats { drops: drops(maps)?, events: events(maps), services: services(maps)? })
}

pub fn services_table(rows: &[ServiceRow]) -> Table {
    let mut t = table(&["FRONTEND", "SCOPE", "SERVICE", "KIND", "ID", "FLAGS", "BACKENDS"]);
    for r in rows {
        let backends = if r.backends.is_empty() {
            if r.flags.contains(&"local-only") { "(none: drop)".into() } else { "(none: reject)".into() }
        } else {
            r.backends.join("\n")
        };
        let service = match (&r.service, &r.port_name) {
            (Some(s), Some(p)) => format!("{s}:{p}"),
            (Some(s), None) => s.clone(),
            (None, _) => "?".into(),
        };
        t.add_row(vec![
            r.frontend.clone(),
            r.scope.into(),
            service,
            r.kind.clone(),
            r.id.to_string(),
            r.flags.join(","),
            backends,
        ]);
    }
    t
}

pub fn maps_table(rows: &[MapRow]) -> Table {
    let mut t = table(&["MAP", "TYPE", "ENTRIES", "CAPACITY", "PINNED", "HOLDS"]);
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for r in rows {
        t.add_row(vec![
            r.name.into(),
            r.map_type.into(),
            opt(r.entries.map(|n| n.to_string())),
            opt(r.capacity.map(|n| n.to_string())),
            if r.pinned { "yes".into() } else { "no".into() },
            r.about.into(),
        ]);
    }
    t
}

pub fn backends_table(rows: &[BackendRow]) -> Table {
    let mut t = table(&["ID", "BACKEND", "PROTO", "LOCAL"]);
    for r in rows {
        t.add_row(vec![r.id.to_string(), r.backend.clone(), r.proto.into(), r.local.to_string()]);
    }
    t
}

pub fn conntrack_table(rows: &[ConntrackRow]) -> Table {
    let mut t = table(&["DIR", "TUPLE", "REWRITE", "BACKEND", "FRONTEND", "TCP", "IDLE", "STATE"]);
    for r in rows {
        t.add_row(vec![
            r.direction.into(),
            r.tuple.clone(),
            r.rewrite.clone(),
            r.backend_id.to_string(),
            r.frontend_id.to_string(),
            r.tcp.clone(),
            format!("{}s", r.idle_s),
            if r.expired { "expired".into() } else { "live".into() },
        ]);
    }
    t
}

pub fn stats_table(s: &Stats) -> (Table, Table) {
    let mut t = table(&["FRONTEND", "SCOPE", "KIND", "PACKETS", "BYTES", "NEW FLOWS"]);
    for r in &s.services {
        t.add_row(vec![
            r.frontend.clone(),
            r.scope.into(),
            r.kind.clone(),
            r.packets.to_string(),
            r.bytes.to_string(),
            r.new_flows.to_string(),
        ]);
    }
    let mut d = table(&["DROP REASON / EVENT", "COUNT"]);
    for (reason, n) in &s.drops {
        d.add_row(vec![reason.to_string(), n.to_string()]);
    }
    for (event, n) in &s.events {
        d.add_row(vec![event.to_string(), n.to_string()]);
    }
    (t, d)
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    t
}

#[derive(Serialize)]
pub struct InterfaceRow {
    pub interface: String,
    pub program: String,
    /// `xdp` or `tc` (north-south on an external interface), `pod`.
    pub hook: &'static str,
}

/// The pinned links: which program serves which interface.
pub fn interfaces(pin_dir: &std::path::Path) -> Result<Vec<InterfaceRow>> {
    let mut rows = Vec::new();
    let dir = crate::attach::links_dir(pin_dir);
    let entries =
        std::fs::read_dir(&dir).with_context(|| format!("reading {} (has the agent run?)", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((program, interface)) = name.split_once('@') else { continue };
        let hook = match program {
            p if p == crate::loader::XDP_PROGRAM => "xdp",
            p if p == crate::loader::TC_EXT_PROGRAM => "tc",
            p if p == crate::loader::TC_POD_PROGRAM => "pod",
            p if p == crate::loader::TC_EGRESS_PROGRAM => "egress",
            p if crate::loader::SOCK_PROGRAMS.contains(&p) => "socket",
            _ => "?",
        };
        rows.push(InterfaceRow { interface: interface.into(), program: program.into(), hook });
    }
    rows.sort_by(|a, b| (a.hook == "pod", &a.interface).cmp(&(b.hook == "pod", &b.interface)));
    Ok(rows)
}

pub fn interfaces_table(rows: &[InterfaceRow]) -> Table {
    let mut t = table(&["INTERFACE", "HOOK", "PROGRAM"]);
    for r in rows {
        t.add_row(vec![r.interface.clone(), r.hook.into(), r.program.clone()]);
    }
    t
}
