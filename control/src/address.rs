//! Advertised addresses: what an instance writes in its registry record for others to connect to.
//! A listen address such as `0.0.0.0:P` or `[::]:P` is where a process accepts connections, not
//! where anyone can reach it, and it is the same on every host (records named after it would
//! overwrite each other), so it is never advertised: `--advertise HOST[:PORT]` says what to
//! advertise, and without it an unspecified listen address is replaced by this host's address on
//! its default route (the address its outgoing connections come from), else the one on the route to
//! the registry, else loopback (a one-host cluster), with a warning.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};

/// Why an `--advertise` value is refused.
#[derive(Debug, thiserror::Error)]
pub enum AdvertiseError {
    #[error("--advertise {0:?}: expected HOST or HOST:PORT")]
    Malformed(String),
    #[error("--advertise {0:?}: an unspecified address (0.0.0.0, ::) cannot be connected to; name this host's address")]
    Unspecified(String),
}

/// A checked `--advertise` value: a host (IP literal or DNS name) and, optionally, a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertise {
    /// IPv6 literals in brackets, ready to be followed by `:port`.
    host: String,
    port: Option<u16>,
}

impl Advertise {
    /// Parses `HOST`, `HOST:PORT`, `[V6]:PORT` or a bare IPv6 literal; refuses unspecified addresses.
    pub fn parse(value: &str) -> Result<Self, AdvertiseError> {
        let value = value.trim();
        let malformed = || AdvertiseError::Malformed(value.to_owned());
        if value.is_empty() || value.contains('/') || value.contains(char::is_whitespace) {
            return Err(malformed());
        }
        let (host, port) = if let Some(rest) = value.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(malformed)?;
            match after {
                "" => (host, None),
                p => (host, Some(p.strip_prefix(':').ok_or_else(malformed)?)),
            }
        } else if value.parse::<Ipv6Addr>().is_ok() {
            (value, None)
        } else {
            match value.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (value, None),
            }
        };
        let port = port.map(|p| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(malformed)).transpose()?;
        let host = match host.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() => return Err(AdvertiseError::Unspecified(value.to_owned())),
            Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
            Ok(IpAddr::V4(ip)) => ip.to_string(),
            // A host name (DNS in a Kubernetes cluster, say), checked for shape only.
            Err(_) if !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') => {
                host.to_owned()
            }
            Err(_) => return Err(malformed()),
        };
        Ok(Advertise { host, port })
    }

    /// `host:port`, with the bound port when the value named none.
    pub fn with_port(&self, bound: u16) -> String {
        format!("{}:{}", self.host, self.port.unwrap_or(bound))
    }
}

/// What to advertise for a server bound to `local`: `advertise` when given, else `local` itself
/// unless its IP is unspecified, in which case this host's routable address with `local`'s port.
/// `registry` (`host:port`) helps find the route when the host has no default route.
pub fn advertised_addr(local: SocketAddr, advertise: Option<&Advertise>, registry: Option<&str>) -> String {
    match advertise {
        Some(a) => a.with_port(local.port()),
        None if !local.ip().is_unspecified() => local.to_string(),
        None => SocketAddr::new(routable_ip(local.is_ipv6(), registry), local.port()).to_string(),
    }
}

/// This host's address as others see it: the source address of the default route, else of the
/// route to the registry, else loopback. No packet is sent: connecting a UDP socket only picks the
/// route.
fn routable_ip(v6: bool, registry: Option<&str>) -> IpAddr {
    let (any, probe): (IpAddr, SocketAddr) = if v6 {
        // Documentation prefixes: routed by the default route, never answered.
        (Ipv6Addr::UNSPECIFIED.into(), SocketAddr::new(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(), 9))
    } else {
        (Ipv4Addr::UNSPECIFIED.into(), SocketAddr::new(Ipv4Addr::new(192, 0, 2, 1).into(), 9))
    };
    let source_towards = |target: SocketAddr| -> Option<IpAddr> {
        let socket = UdpSocket::bind(SocketAddr::new(any, 0)).ok()?;
        socket.connect(target).ok()?;
        Some(socket.local_addr().ok()?.ip()).filter(|ip| !ip.is_unspecified())
    };
    if let Some(ip) = source_towards(probe).filter(|ip| !ip.is_loopback()) {
        return ip;
    }
    let towards_registry = registry
        .and_then(|r| r.to_socket_addrs().ok())
        .into_iter()
        .flatten()
        .filter(|a| a.is_ipv6() == v6)
        .find_map(source_towards);
    if let Some(ip) = towards_registry {
        return ip;
    }
    let loopback: IpAddr = if v6 { Ipv6Addr::LOCALHOST.into() } else { Ipv4Addr::LOCALHOST.into() };
    tracing::warn!(
        "no route to other hosts found: advertising {loopback} (pass --advertise to name this host's address)"
    );
    loopback
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertise_values_keep_or_replace_the_port() {
        let at = |v: &str| Advertise::parse(v).map(|a| a.with_port(7000));
        assert_eq!(at("10.0.0.5").expect("valid"), "10.0.0.5:7000");
        assert_eq!(at("10.0.0.5:81").expect("valid"), "10.0.0.5:81");
        assert_eq!(at("worker-3.epserve.svc").expect("valid"), "worker-3.epserve.svc:7000");
        assert_eq!(at("worker-3:9000").expect("valid"), "worker-3:9000");
        assert_eq!(at("[fd00::5]:81").expect("valid"), "[fd00::5]:81");
        assert_eq!(at("fd00::5").expect("valid"), "[fd00::5]:7000");
        for bad in ["", "0.0.0.0", "0.0.0.0:80", "[::]:80", "::", "h:0", "h:x", "h/x", "[fd00::5", "a b", ":80"] {
            assert!(at(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn an_unspecified_listen_address_is_never_advertised() {
        for listen in ["0.0.0.0:7001", "[::]:7001"] {
            let local: SocketAddr = listen.parse().expect("an address");
            let advertised = advertised_addr(local, None, Some("127.0.0.1:2379"));
            let addr: SocketAddr = advertised.parse().expect("an address");
            assert!(!addr.ip().is_unspecified(), "{listen} → {advertised}");
            assert_eq!(addr.port(), 7001);
        }
        let bound: SocketAddr = "127.0.0.1:7002".parse().expect("an address");
        assert_eq!(advertised_addr(bound, None, None), "127.0.0.1:7002", "a specific address stays");
        let named = Advertise::parse("10.1.2.3").expect("valid");
        assert_eq!(advertised_addr(bound, Some(&named), None), "10.1.2.3:7002");
    }
}
