//! Turning names into addresses: the master's, and the local address a rank
//! listens on by default (the one its host uses to reach the master).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};

use crate::error::{Result, RpcError};

/// Resolves `host:port`, preferring IPv4.
pub(crate) fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| RpcError::Init(format!("cannot resolve '{host}': {e}")))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| RpcError::Init(format!("'{host}' has no address")))
}

/// The local address this host uses to reach `master` (no packet is sent).
pub(crate) fn local_ip_towards(master: SocketAddr) -> Result<IpAddr> {
    if master.ip().is_loopback() {
        return Ok(master.ip());
    }
    let unspecified: SocketAddr = if master.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        "[::]:0".parse().expect("valid address")
    };
    let probe = UdpSocket::bind(unspecified).and_then(|s| {
        s.connect(master)?;
        s.local_addr()
    });
    probe
        .map(|a| a.ip())
        .map_err(|e| RpcError::Init(format!("no route to the master {master}: {e}")))
}
