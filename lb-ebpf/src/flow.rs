//! What happens to a packet: an established flow keeps its translation; the
//! first packet to a frontend gets a backend (`lb`), a forwarding decision
//! and both conntrack entries. The hooks carry the verdict out.

use lb_common::{
    Backend, CtEntry, CtKey, Drop, Event, Frontend, L4, Nat, backend_flags, config_flags, ct_flags, ct_tcp,
};

use crate::{
    conntrack::{self, Over},
    frag,
    lb::{self, Choice, Origin, Unserved},
    maps::{self, count_packet},
    parse::{Fragment, Packet},
    snat,
};

pub enum Verdict {
    /// Not service traffic: leave it to the stack.
    Pass,
    Drop(Drop),
    /// Answer ICMP port unreachable (a service without endpoints, a
    /// ClusterIP's unused port), counted as the reason says.
    Reject(Drop),
    /// Rewrite the packet as its conntrack entry says.
    Translate(Nat),
}

/// How a new flow reaches its backend.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Forwarding {
    /// Destination NAT only: the reply passes this node anyway.
    Direct,
    /// Also source NAT to this node, so that the reply comes back here to
    /// be translated: an external client reaching a backend on another
    /// node, or a pod reaching itself through its Service (hairpin), whose
    /// reply to its own address would never leave it. kube-proxy
    /// masquerades both.
    Snat,
}

#[inline(always)]
pub fn forwarding(origin: Origin, backend: &Backend, client: [u8; 4]) -> Forwarding {
    let remote_from_outside = origin == Origin::External && backend.flags & backend_flags::LOCAL == 0;
    let hairpin = origin == Origin::Pod && backend.addr == client;
    if remote_from_outside || hairpin { Forwarding::Snat } else { Forwarding::Direct }
}

/// `redirects`: the hook forwards translated packets itself, around the
/// host stack (TC); a new flow from outside (or a hairpin flow, both of
/// whose directions pass this hook) is then marked to do so both ways,
/// unless the operator asked for the stack (`VIA_STACK`).
#[inline(always)]
pub fn process(pkt: &Packet, origin: Origin, redirects: bool) -> Verdict {
    let now = conntrack::now();
    if let Some(entry) = conntrack::lookup(&pkt.key, pkt.tcp_flags, now) {
        // Replies are always translated back. A request keeps its backend
        // while the backend is one of its frontend's endpoints, and a TCP
        // connection (or SCTP association) even after it left (kube-proxy
        // flushes only UDP's conntrack): a terminating pod may still serve
        // it, and new connections avoid it anyway. UDP flows move to a live
        // backend at once.
        if entry.is_reply() || pkt.proto != L4::Udp || maps::is_endpoint(entry.frontend_id, entry.backend_id)
        {
            count_packet(entry.frontend_id, pkt.ip_len as u32, false);
            return translate(pkt, entry.nat(), entry.frontend_id);
        }
    }
    match lb::frontend(pkt.key.daddr, pkt.key.dport, pkt.key.proto, origin) {
        Some(fe) => {
            let may_bypass =
                redirects && maps::config().is_none_or(|c| c.flags & config_flags::VIA_STACK == 0);
            new_flow(pkt, &fe, origin, may_bypass)
        }
        None => match lb::unserved(pkt.key.daddr) {
            Unserved::Pass => Verdict::Pass,
            Unserved::Reject => Verdict::Reject(Drop::ClusterIpPort),
            Unserved::Drop => Verdict::Drop(Drop::UnallocatedClusterIp),
        },
    }
}

/// A first fragment's translation is kept for the fragments that follow.
#[inline(always)]
fn translate(pkt: &Packet, nat: Nat, frontend_id: u32) -> Verdict {
    if pkt.fragment == Fragment::First {
        frag::remember(pkt, &nat, frontend_id);
    }
    Verdict::Translate(nat)
}

/// A packet the host stack sends from one of the node's addresses: the
/// reply of an endpoint there (a hostNetwork server) is translated back,
/// like a pod's at `lb_tc_pod`; anything else is the host's own traffic.
#[inline(always)]
pub fn host_reply(pkt: &Packet) -> Verdict {
    if !maps::is_node_addr(&pkt.key.saddr) {
        return Verdict::Pass;
    }
    match conntrack::lookup(&pkt.key, pkt.tcp_flags, conntrack::now()) {
        Some(entry) if entry.is_reply() => {
            count_packet(entry.frontend_id, pkt.ip_len as u32, false);
            translate(pkt, entry.nat(), entry.frontend_id)
        }
        _ => Verdict::Pass,
    }
}

// Its own BPF function: a stack frame apart from the established-flow path
// (and at most five arguments, the verdict's pointer included).
#[inline(never)]
fn new_flow(pkt: &Packet, fe: &Frontend, origin: Origin, may_bypass: bool) -> Verdict {
    let now = conntrack::now();
    if pkt.proto == L4::Tcp && pkt.tcp_flags & ct_tcp::SYN == 0 {
        // Mid-stream: this flow's entries were evicted or have expired.
        maps::count_event(Event::CtRecreated);
    }
    let client = pkt.key.saddr;
    let (backend_id, backend) = match lb::choose(fe, client, now) {
        Choice::Backend(id, backend) => (id, backend),
        Choice::Reject => return Verdict::Reject(Drop::Rejected),
        Choice::Drop(reason) => return Verdict::Drop(reason),
    };
    let how = forwarding(origin, &backend, client);
    let bypass = may_bypass && (origin == Origin::External || how == Forwarding::Snat);
    match open(pkt, fe.id, backend_id, &backend, how, bypass, now) {
        Ok(nat) => {
            lb::remember(fe, client, backend_id, now);
            count_packet(fe.id, pkt.ip_len as u32, true);
            translate(pkt, nat, fe.id)
        }
        Err(reason) => Verdict::Drop(reason),
    }
}

/// Writes both conntrack entries of a new flow and returns the request's
/// rewrite. The reply entry goes in first: once the request entry exists,
/// the flow's replies must find theirs.
#[inline(always)]
fn open(
    pkt: &Packet,
    frontend_id: u32,
    backend_id: u32,
    backend: &Backend,
    how: Forwarding,
    bypass: bool,
    now: u64,
) -> Result<Nat, Drop> {
    let both = if bypass { ct_flags::BYPASS } else { 0 };
    let mut request = CtEntry {
        nat_daddr: backend.addr,
        nat_dport: backend.port,
        backend_id,
        frontend_id,
        last_seen: now,
        flags: ct_flags::REWRITE_DST | both,
        tcp: pkt.tcp_flags,
        ..CtEntry::default()
    };
    let buf = maps::flow_buf().ok_or(Drop::ConntrackFull)?;
    let (client, client_port) = (pkt.key.saddr, pkt.key.sport);
    buf.reply = CtEntry {
        nat_saddr: pkt.key.daddr,
        nat_sport: pkt.key.dport,
        backend_id,
        frontend_id,
        last_seen: now,
        flags: ct_flags::REPLY | ct_flags::REWRITE_SRC | both,
        ..CtEntry::default()
    };
    buf.reply_key = CtKey::new(backend.addr, client, backend.port, client_port, pkt.key.proto);
    // The source the backend sees, if it is not the client's own: the
    // node's (SNAT), or on a clash the client's address with another port.
    let source = match how {
        Forwarding::Snat => Some(ct_flags::SNAT),
        // Another live flow may have this reply tuple (the same client port
        // to another frontend with this backend): then this one moves to a
        // free source port of the client's address, as netfilter does.
        // (The client chose its port again: its old flow there is over
        // for it.)
        Forwarding::Direct if !conntrack::claim(&buf.reply_key, &buf.reply, now, Over::Closed) => {
            maps::count_event(Event::NatRemapped);
            Some(0)
        }
        Forwarding::Direct => None,
    };
    if let Some(snat) = source {
        let cfg = maps::config().ok_or(Drop::NoConfig)?;
        let addr = if snat != 0 { cfg.snat_addr } else { client };
        // Replies arrive for the new source and go back to the client.
        buf.reply.flags |= ct_flags::REWRITE_DST | snat;
        buf.reply.nat_daddr = client;
        buf.reply.nat_dport = client_port;
        let port =
            snat::claim_port(&mut buf.reply_key, &buf.reply, addr, &cfg, now).ok_or(Drop::NatExhausted)?;
        request.flags |= ct_flags::REWRITE_SRC | snat;
        request.nat_saddr = addr;
        request.nat_sport = port;
    }
    conntrack::insert(&pkt.key, &request).map_err(|_| Drop::ConntrackFull)?;
    Ok(request.nat())
}
