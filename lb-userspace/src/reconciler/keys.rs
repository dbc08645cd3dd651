//! The one place where the agent's types become kernel map keys and values,
//! and back (adoption, inspection).

use std::net::{IpAddr, Ipv4Addr};

use lb_common::{Backend, FrontendKey, L4, Scope, backend_flags};

use crate::frontend::{BackendAddr, Frontend};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}: IPv6 is not programmed yet (the maps hold IPv4)")]
    Ipv6(IpAddr),
}

pub fn ipv4(ip: IpAddr) -> Result<[u8; 4], KeyError> {
    match ip {
        IpAddr::V4(v4) => Ok(v4.octets()),
        IpAddr::V6(_) => Err(KeyError::Ipv6(ip)),
    }
}

pub fn frontend_key(f: &Frontend) -> Result<FrontendKey, KeyError> {
    Ok(FrontendKey::new(ipv4(f.ip)?, f.port, f.l4, f.scope))
}

/// The frontend a key stands for; `None` for a key no agent writes.
pub fn frontend_of(k: &FrontendKey) -> Option<Frontend> {
    let l4 = L4::from_proto(k.proto)?;
    let scope = Scope::from_u8(k.scope)?;
    Some(Frontend::new(Ipv4Addr::from(k.addr), k.port, l4).with_scope(scope))
}

pub fn backend_value(b: &BackendAddr, local: bool) -> Result<Backend, KeyError> {
    Ok(Backend {
        addr: ipv4(b.ip)?,
        port: b.port,
        proto: b.l4.proto(),
        flags: if local { backend_flags::LOCAL } else { 0 },
    })
}

/// The backend a value stands for, and whether it is local.
pub fn backend_of(b: &Backend) -> Option<(BackendAddr, bool)> {
    let addr = BackendAddr { ip: Ipv4Addr::from(b.addr).into(), port: b.port, l4: L4::from_proto(b.proto)? };
    Some((addr, b.flags & backend_flags::LOCAL != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontends_and_backends_round_trip() {
        let f = Frontend::node_port(30080, L4::Udp).with_scope(Scope::Internal);
        assert_eq!(frontend_of(&frontend_key(&f).unwrap()), Some(f));
        let b = BackendAddr { ip: Ipv4Addr::new(10, 244, 1, 5).into(), port: 8080, l4: L4::Tcp };
        assert_eq!(backend_of(&backend_value(&b, true).unwrap()), Some((b, true)));
    }

    #[test]
    fn ipv6_is_refused_with_a_reason() {
        let f = Frontend::new(IpAddr::V6("fd00::1".parse().unwrap()), 80, L4::Tcp);
        let err = frontend_key(&f).unwrap_err().to_string();
        assert!(err.contains("fd00::1") && err.contains("IPv6"), "{err}");
    }
}
