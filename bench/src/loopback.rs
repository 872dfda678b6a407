//! Guards that keep every socket of the load client on the loopback network:
//! the server address must be in 127.0.0.0/8 (or `::1`), and the client binds
//! its sockets to source addresses 127.0.0.1 to 127.0.0.N.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{bail, Result};

/// Most source addresses the client binds to: 127.0.0.1 to 127.0.0.254.
pub const MAX_SOURCE_ADDRESSES: u8 = 254;

/// Rejects a server address outside the loopback network.
pub fn check_server(addr: SocketAddr) -> Result<()> {
    if !addr.ip().is_loopback() {
        bail!("server address {addr} is not a loopback address: partyhost-bench only targets 127.0.0.0/8 or ::1");
    }
    Ok(())
}

/// Returns the source addresses 127.0.0.1 to 127.0.0.`count`. Each one
/// gives the client its own range of ephemeral ports (about 28,000 with
/// Linux's default `ip_local_port_range`), so `count` addresses carry
/// `count` times as many sockets to one server port.
pub fn source_addresses(count: u8) -> Result<Vec<IpAddr>> {
    if count == 0 || count > MAX_SOURCE_ADDRESSES {
        bail!("source address count {count} is invalid: use 1 to {MAX_SOURCE_ADDRESSES}");
    }
    Ok((1..=count).map(|last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_outside_loopback_is_rejected() {
        assert!(check_server("10.0.0.1:80".parse().unwrap()).is_err());
        assert!(check_server("127.0.0.1:80".parse().unwrap()).is_ok());
        assert!(check_server("127.9.9.9:80".parse().unwrap()).is_ok());
        assert!(check_server("[::1]:80".parse().unwrap()).is_ok());
    }

    #[test]
    fn source_addresses_stay_in_loopback() {
        let addresses = source_addresses(3).unwrap();
        assert_eq!(addresses.len(), 3);
        assert!(addresses.iter().all(IpAddr::is_loopback));
        assert!(source_addresses(0).is_err());
        assert!(source_addresses(255).is_err());
    }
}
