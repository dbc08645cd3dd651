//! The agent's own names for what the dataplane serves: a frontend (an
//! address that may be IPv4 or IPv6, a port, a protocol and a scope) and a
//! backend. Kernel map keys are made from these in one place,
//! `reconciler::keys`.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
};

pub use lb_common::{FrontendKind, L4, Scope};

/// What clients address: a service address and port, or a NodePort on
/// every node address (the unspecified address), for one protocol and one
/// `Scope` of clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub l4: L4,
    pub scope: Scope,
}

impl Frontend {
    /// An external-scope frontend on `ip`.
    pub fn new(ip: impl Into<IpAddr>, port: u16, l4: L4) -> Self {
        Self { ip: ip.into(), port, l4, scope: Scope::External }
    }

    /// A NodePort: `port` on every IPv4 address of the node.
    pub fn node_port(port: u16, l4: L4) -> Self {
        Self::new(Ipv4Addr::UNSPECIFIED, port, l4)
    }

    pub fn is_node_port(&self) -> bool {
        self.ip.is_unspecified()
    }

    pub fn with_scope(self, scope: Scope) -> Self {
        Self { scope, ..self }
    }

    /// `10.96.0.10:80/TCP`, `*:30080/TCP`, `[fd00::1]:80/TCP`; without the scope.
    pub fn address(&self) -> String {
        let port = self.port;
        let l4 = self.l4.name();
        match self.ip {
            ip if ip.is_unspecified() => format!("*:{port}/{l4}"),
            IpAddr::V4(ip) => format!("{ip}:{port}/{l4}"),
            IpAddr::V6(ip) => format!("[{ip}]:{port}/{l4}"),
        }
    }
}

/// The address, and the scope where it is not the default external one.
impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.address())?;
        if self.scope != Scope::External {
            write!(f, " {}", self.scope.name())?;
        }
        Ok(())
    }
}

/// A pod endpoint: the same address, port and protocol is one backend for
/// every frontend that uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
    pub l4: L4,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    #[test]
    fn frontends_print_as_operators_read_them() {
        assert_eq!(Frontend::new(Ipv4Addr::new(10, 96, 0, 10), 80, L4::Tcp).to_string(), "10.96.0.10:80/TCP");
        assert_eq!(Frontend::node_port(30080, L4::Udp).to_string(), "*:30080/UDP");
        let v6 = Frontend::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1), 443, L4::Sctp);
        assert_eq!(v6.to_string(), "[fd00::1]:443/SCTP");
        assert_eq!(v6.with_scope(Scope::Internal).to_string(), "[fd00::1]:443/SCTP internal");
    }

    #[test]
    fn a_twin_sorts_right_after_its_external_frontend() {
        let ext = Frontend::node_port(30080, L4::Tcp);
        let int = ext.with_scope(Scope::Internal);
        let next = Frontend::node_port(30081, L4::Tcp);
        let mut v = vec![next, int, ext];
        v.sort();
        assert_eq!(v, vec![ext, int, next]);
    }
}
