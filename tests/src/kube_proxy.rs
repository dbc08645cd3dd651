//! The benchmark's baseline: kube-proxy's rule sets for the synthetic
//! services of `bench`, written the way its two netfilter modes write them.
//!
//! - iptables mode: `iptables-restore` input with the filter chains
//!   (KUBE-FORWARD and the portal jumps) and the nat chains: KUBE-SERVICES
//!   with one rule per service port, KUBE-SVC-* choosing an endpoint with
//!   `statistic --mode random`, KUBE-SEP-* doing the DNAT, and the 0x4000
//!   masquerade mark honoured in KUBE-POSTROUTING.
//! - nftables mode: `nft -f` commands for the `kube-proxy` table: the
//!   service-ips verdict map, `numgen random` over endpoint chains, the
//!   filter-forward checks and the masquerading chain.
//!
//! Each also has the incremental update kube-proxy writes when one
//! endpoint of one service changes.

use std::{fmt::Write as _, net::Ipv4Addr};

use crate::bench::{Proto, endpoints_of, vip_of};

/// Cluster CIDR given to kube-proxy: traffic from outside it to a cluster
/// IP is marked for masquerade. The synthetic endpoints live in it.
pub const CLUSTER_CIDR: &str = "10.128.0.0/10";
const TARGET_PORT: u16 = 8080;
const PORT: u16 = 80;

fn svc_chain(i: u32) -> String {
    format!("KUBE-SVC-{i:016X}")
}

fn sep_chain(i: u32, ep: Ipv4Addr) -> String {
    format!("KUBE-SEP-{i:08X}{:08X}", u32::from(ep))
}

/// The filter table's own chains, rewritten by every sync.
const IPTABLES_FILTER: &str = ":KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
";

/// The jumps from the built-in chains, which kube-proxy ensures once (not
/// in every restore, where they would be appended again).
const IPTABLES_FILTER_JUMPS: &str = "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
";
const IPTABLES_NAT_JUMPS: &str =
    "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
";

/// The nat table's opening: the top-level chains every sync writes in full,
/// then `chains` (restore wants every chain declared before any rule).
fn iptables_nat_head(out: &mut String, chains: impl IntoIterator<Item = String>) {
    out.push_str(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    for chain in chains {
        writeln!(out, ":{chain} - [0:0]").ok();
    }
}

/// The top-level chains' rules: one KUBE-SERVICES rule per service port.
fn iptables_nat_top(out: &mut String, n: u32, proto: Proto) {
    let p = proto.name();
    for i in 0..n {
        writeln!(
            out,
            "-A KUBE-SERVICES -d {}/32 -p {p} -m comment --comment \"bench/svc-{i} cluster IP\" -m {p} --dport {PORT} -j {}",
            vip_of(i),
            svc_chain(i)
        )
        .ok();
    }
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
}

/// KUBE-SVC-i: masquerade mark for off-cluster clients, then one endpoint
/// at random (probability 1/remaining, as kube-proxy writes it).
fn iptables_svc(out: &mut String, i: u32, proto: Proto, endpoints: &[Ipv4Addr]) {
    let (p, svc, vip) = (proto.name(), svc_chain(i), vip_of(i));
    writeln!(
        out,
        "-A {svc} ! -s {CLUSTER_CIDR} -d {vip}/32 -p {p} -m comment --comment \"bench/svc-{i} cluster IP\" -m {p} --dport {PORT} -j KUBE-MARK-MASQ"
    )
    .ok();
    for (j, ep) in endpoints.iter().enumerate() {
        let left = endpoints.len() - j;
        let pick = if left > 1 {
            format!(" -m statistic --mode random --probability {:.11}", 1.0 / left as f64)
        } else {
            String::new()
        };
        writeln!(
            out,
            "-A {svc} -m comment --comment \"bench/svc-{i} -> {ep}:{TARGET_PORT}\"{pick} -j {}",
            sep_chain(i, *ep)
        )
        .ok();
    }
}

fn iptables_sep(out: &mut String, i: u32, proto: Proto, ep: Ipv4Addr) {
    let (p, sep) = (proto.name(), sep_chain(i, ep));
    writeln!(out, "-A {sep} -s {ep}/32 -m comment --comment bench/svc-{i} -j KUBE-MARK-MASQ").ok();
    writeln!(
        out,
        "-A {sep} -p {p} -m comment --comment bench/svc-{i} -m {p} -j DNAT --to-destination {ep}:{TARGET_PORT}"
    )
    .ok();
}

/// The full rule set for `n` services × `per` endpoints (iptables-restore).
pub fn iptables_rules(n: u32, per: u32, proto: Proto) -> String {
    let mut out = format!("*filter\n{IPTABLES_FILTER}{IPTABLES_FILTER_JUMPS}COMMIT\n");
    let chains = (0..n).flat_map(|i| {
        std::iter::once(svc_chain(i)).chain(endpoints_of(i, per).into_iter().map(move |ep| sep_chain(i, ep)))
    });
    iptables_nat_head(&mut out, chains);
    iptables_nat_top(&mut out, n, proto);
    for i in 0..n {
        let endpoints = endpoints_of(i, per);
        iptables_svc(&mut out, i, proto, &endpoints);
        for ep in endpoints {
            iptables_sep(&mut out, i, proto, ep);
        }
    }
    out.push_str(IPTABLES_NAT_JUMPS);
    out.push_str("COMMIT\n");
    out
}

/// kube-proxy's partial sync after service `i`'s endpoints went from `old`
/// to `new` (`iptables-restore --noflush`): the top-level chains in full,
/// the changed service chain, the new endpoint chains, the old ones deleted.
pub fn iptables_change(n: u32, i: u32, proto: Proto, old: &[Ipv4Addr], new: &[Ipv4Addr]) -> String {
    let mut out = format!("*filter\n{IPTABLES_FILTER}COMMIT\n");
    let added: Vec<_> = new.iter().filter(|e| !old.contains(e)).copied().collect();
    let removed: Vec<_> = old.iter().filter(|e| !new.contains(e)).copied().collect();
    let chains = added.iter().chain(&removed).map(|ep| sep_chain(i, *ep));
    iptables_nat_head(&mut out, std::iter::once(svc_chain(i)).chain(chains));
    iptables_nat_top(&mut out, n, proto);
    iptables_svc(&mut out, i, proto, new);
    for ep in &added {
        iptables_sep(&mut out, i, proto, *ep);
    }
    for ep in &removed {
        writeln!(out, "-X {}", sep_chain(i, *ep)).ok();
    }
    out.push_str("COMMIT\n");
    out
}

fn nft_service(i: u32, proto: Proto) -> String {
    format!("service-bench/svc-{i}/{}/", proto.name())
}

fn nft_endpoint(i: u32, proto: Proto, ep: Ipv4Addr) -> String {
    format!("endpoint-bench/svc-{i}/{}/__{ep}/{TARGET_PORT}", proto.name())
}

const NFT_BASE: &str = "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }
add chain ip kube-proxy mark-for-masquerade
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add chain ip kube-proxy masquerading
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }
add chain ip kube-proxy services
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add chain ip kube-proxy service-endpoints-check
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add chain ip kube-proxy cluster-ips-check
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"
add rule ip kube-proxy cluster-ips-check ip daddr 10.96.0.0/12 drop comment \"Drop traffic to unallocated ClusterIPs\"
add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add rule ip kube-proxy nat-prerouting jump services
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add rule ip kube-proxy nat-output jump services
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add rule ip kube-proxy nat-postrouting jump masquerading
";

fn nft_service_rules(out: &mut String, i: u32, proto: Proto, endpoints: &[Ipv4Addr]) {
    let (p, chain, vip) = (proto.name(), nft_service(i, proto), vip_of(i));
    writeln!(
        out,
        "add rule ip kube-proxy {chain} ip daddr {vip} {p} dport {PORT} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade"
    )
    .ok();
    let arms: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(j, ep)| format!("{j} : goto {}", nft_endpoint(i, proto, *ep)))
        .collect();
    writeln!(
        out,
        "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
        endpoints.len(),
        arms.join(" , ")
    )
    .ok();
}

fn nft_endpoint_rules(out: &mut String, i: u32, proto: Proto, ep: Ipv4Addr) {
    let chain = nft_endpoint(i, proto, ep);
    writeln!(out, "add chain ip kube-proxy {chain}").ok();
    writeln!(out, "add rule ip kube-proxy {chain} ip saddr {ep} jump mark-for-masquerade").ok();
    writeln!(out, "add rule ip kube-proxy {chain} meta l4proto {} dnat to {ep}:{TARGET_PORT}", proto.name())
        .ok();
}

/// The full `kube-proxy` table for `n` services × `per` endpoints (`nft -f`),
/// one transaction as kube-proxy's first sync writes it.
pub fn nft_rules(n: u32, per: u32, proto: Proto) -> String {
    let mut out = String::from(NFT_BASE);
    for i in 0..n {
        let endpoints = endpoints_of(i, per);
        for ep in &endpoints {
            nft_endpoint_rules(&mut out, i, proto, *ep);
        }
        writeln!(out, "add chain ip kube-proxy {}", nft_service(i, proto)).ok();
        nft_service_rules(&mut out, i, proto, &endpoints);
        writeln!(out, "add element ip kube-proxy cluster-ips {{ {} }}", vip_of(i)).ok();
        writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {} . {} . {PORT} : goto {} }}",
            vip_of(i),
            proto.name(),
            nft_service(i, proto)
        )
        .ok();
    }
    out
}

/// kube-proxy's nftables transaction after service `i`'s endpoints went
/// from `old` to `new`: new endpoint chains, the service chain flushed and
/// rewritten, the old endpoint chains deleted.
pub fn nft_change(i: u32, proto: Proto, old: &[Ipv4Addr], new: &[Ipv4Addr]) -> String {
    let mut out = String::new();
    for ep in new.iter().filter(|e| !old.contains(e)) {
        nft_endpoint_rules(&mut out, i, proto, *ep);
    }
    writeln!(out, "flush chain ip kube-proxy {}", nft_service(i, proto)).ok();
    nft_service_rules(&mut out, i, proto, new);
    for ep in old.iter().filter(|e| !new.contains(e)) {
        writeln!(out, "delete chain ip kube-proxy {}", nft_endpoint(i, proto, *ep)).ok();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_walks_every_service_then_picks_among_endpoints() {
        let rules = iptables_rules(3, 2, Proto::Udp);
        assert_eq!(rules.matches("-A KUBE-SERVICES -d 10.96.0.").count(), 3);
        assert!(rules.contains("--probability 0.50000000000 -j KUBE-SEP-"));
        assert!(rules.contains("-j DNAT --to-destination 10.128.0.5:8080"));
        assert!(
            rules.contains(
                "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
            )
        );
    }

    #[test]
    fn an_endpoint_change_rewrites_one_service_and_the_top_level_chains() {
        let old = endpoints_of(1, 2);
        let mut new = old.clone();
        new[0] = Ipv4Addr::new(10, 200, 0, 1);
        let ipt = iptables_change(3, 1, Proto::Tcp, &old, &new);
        assert_eq!(ipt.matches("-A KUBE-SERVICES -d").count(), 3);
        assert!(ipt.contains(&format!("-X {}", sep_chain(1, old[0]))));
        assert!(ipt.contains("--to-destination 10.200.0.1:8080"));
        let nft = nft_change(1, Proto::Tcp, &old, &new);
        assert!(nft.contains("flush chain ip kube-proxy service-bench/svc-1/tcp/"));
        assert!(nft.contains(&format!("delete chain ip kube-proxy {}", nft_endpoint(1, Proto::Tcp, old[0]))));
    }
}
