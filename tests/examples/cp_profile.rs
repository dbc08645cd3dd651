//! Where an endpoint change's time goes at 10k services (release build).
use std::{collections::BTreeSet, time::Instant};

use lb_tests::bench::{Proto, endpoints_of, service_yaml, write_manifests};
use lb_userspace::{
    model::{Model, NodeInfo},
    reconciler::{NodeSettings, Reconciler},
    sources::manifests::Folder,
};

fn main() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join("cp-profile");
    let _ = std::fs::remove_dir_all(&dir);
    write_manifests(&dir, 10_000, 10, Proto::Tcp, None)?;
    let node = NodeInfo {
        name: "bench".into(),
        zone: None,
        addresses: vec![[192, 0, 2, 11].into()],
        ..Default::default()
    };
    let addr = std::net::IpAddr::from([192, 0, 2, 11]);
    let settings = NodeSettings {
        addresses: BTreeSet::from([addr]),
        snat_addr: addr,
        nat_ports: (61000, 65535),
        via_stack: false,
        service_cidrs: Vec::new(),
    };
    let mut folder = Folder::new(&dir);
    let t = Instant::now();
    let (state, _) = folder.refresh();
    println!("first refresh {:?}", t.elapsed());
    let mut model = Model::default();
    let t = Instant::now();
    let desired = model.desired(state, &node);
    println!("first desired state {:?}", t.elapsed());
    let mut r = Reconciler::new();
    let t = Instant::now();
    let ops = r.plan(desired, &settings)?;
    println!("first plan {:?} ({} ops)", t.elapsed(), ops.len());
    let mut eps = endpoints_of(9999, 10);
    eps[0] = [10, 200, 0, 1].into();
    let mut text: String =
        (9900..9999).map(|i| service_yaml(i, Proto::Tcp, None, &endpoints_of(i, 10))).collect();
    text.push_str(&service_yaml(9999, Proto::Tcp, None, &eps));
    std::fs::write(dir.join("svc-0099.yaml"), text)?;
    let t = Instant::now();
    let (state, _) = folder.refresh();
    let t1 = t.elapsed();
    let desired = model.desired(state, &node);
    let t2 = t.elapsed();
    let ops = r.plan(desired, &settings)?;
    println!(
        "change: refresh {t1:?}, +desired {:?}, +plan {:?} ({} ops)",
        t2 - t1,
        t.elapsed() - t2,
        ops.len()
    );
    Ok(())
}
