//! Which addresses an image URL may be fetched from: the SSRF policy of `--image-fetch`.
//!
//! Only globally routable unicast addresses are fetched by default. Loopback, private (RFC 1918),
//! shared (RFC 6598), link-local (which holds the cloud metadata endpoint 169.254.169.254),
//! unique-local, documentation and other special-purpose ranges (the IANA special-purpose registries,
//! RFC 6890) are *internal*: fetched only with `--image-fetch-allow-private`. Unspecified, multicast
//! and broadcast addresses are never a host to connect to. IPv6 addresses that carry an IPv4 address
//! (mapped, compatible, NAT64, 6to4) are judged by that IPv4 address, so that `[::ffff:127.0.0.1]`
//! is loopback.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What an address is, for the fetch policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// Globally routable unicast: always fetched.
    Global,
    /// Inside some network (loopback, private, link-local, ...): fetched only when allowed.
    Internal(&'static str),
    /// Not a unicast host (unspecified, multicast, broadcast): never fetched.
    Never(&'static str),
}

/// The fetch policy: which classes of address are connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressPolicy {
    pub allow_internal: bool,
}

impl AddressPolicy {
    /// `Err` says why `ip` may not be fetched from.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        match classify(ip) {
            AddressClass::Global => Ok(()),
            AddressClass::Internal(_) if self.allow_internal => Ok(()),
            AddressClass::Internal(what) => {
                Err(format!("{ip} is a {what} address (allowed only with --image-fetch-allow-private)"))
            }
            AddressClass::Never(what) => Err(format!("{ip} is a {what} address")),
        }
    }
}

pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    use AddressClass::{Global, Internal, Never};
    let [a, b, c, _] = ip.octets();
    if ip.is_unspecified() || a == 0 {
        // 0.0.0.0/8, "this network": connecting to 0.0.0.0 reaches the local host on Linux.
        return Never("unspecified");
    }
    if ip.is_broadcast() {
        return Never("broadcast");
    }
    if ip.is_multicast() {
        return Never("multicast");
    }
    if ip.is_loopback() {
        return Internal("loopback");
    }
    if ip.is_private() {
        return Internal("private");
    }
    if ip.is_link_local() {
        return Internal("link-local");
    }
    match (a, b, c) {
        (100, 64..=127, _) => Internal("shared (carrier-grade NAT)"),
        (192, 0, 0) => Internal("IETF protocol assignment"),
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Internal("documentation"),
        (198, 18..=19, _) => Internal("benchmarking"),
        (240..=255, _, _) => Internal("reserved"),
        _ => Global,
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    use AddressClass::{Global, Internal, Never};
    if ip.is_unspecified() {
        return Never("unspecified");
    }
    if ip.is_multicast() {
        return Never("multicast");
    }
    if ip.is_loopback() {
        return Internal("loopback");
    }
    if let Some(v4) = embedded_v4(ip) {
        return classify_v4(v4);
    }
    let s = ip.segments();
    match s[0] {
        0xfe80..=0xfebf => Internal("link-local"),
        0xfec0..=0xfeff => Internal("site-local"),
        0xfc00..=0xfdff => Internal("unique-local"),
        0x2001 if s[1] == 0x0db8 => Internal("documentation"),
        // Teredo tunnels reach whatever the relay can: not a host we can judge.
        0x2001 if s[1] == 0 => Internal("Teredo"),
        0x0064 if s[1] == 0xff9b && s[2] == 1 => Internal("local-use NAT64"),
        0x0100 if s[1..4] == [0, 0, 0] => Internal("discard-only"),
        // Everything outside 2000::/3 is unassigned or special.
        0x2000..=0x3fff => Global,
        _ => Internal("reserved"),
    }
}

/// The IPv4 address an IPv6 address stands for: mapped (`::ffff:a.b.c.d`), compatible
/// (`::a.b.c.d`, deprecated), NAT64 (`64:ff9b::a.b.c.d`) and 6to4 (`2002:AABB:CCDD::`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0, 0, _, _] | [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(ip: &str) -> AddressClass {
        classify(ip.parse().expect("an address"))
    }

    #[test]
    fn global_addresses_are_fetched() {
        for ip in ["8.8.8.8", "1.1.1.1", "93.184.216.34", "100.63.255.255", "100.128.0.1", "2606:4700::1111"] {
            assert_eq!(class(ip), AddressClass::Global, "{ip}");
        }
        let policy = AddressPolicy { allow_internal: false };
        assert!(policy.check("8.8.4.4".parse().expect("ip")).is_ok());
    }

    #[test]
    fn internal_addresses_only_when_allowed() {
        let internal = [
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "fec0::1",
            "2001:db8::1",
            // IPv4 inside IPv6 is judged as IPv4.
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
        ];
        let closed = AddressPolicy { allow_internal: false };
        let open = AddressPolicy { allow_internal: true };
        for ip in internal {
            assert!(matches!(class(ip), AddressClass::Internal(_)), "{ip}: {:?}", class(ip));
            let addr = ip.parse().expect("ip");
            let refusal = closed.check(addr).expect_err(ip);
            assert!(refusal.contains("--image-fetch-allow-private"), "{refusal}");
            assert!(open.check(addr).is_ok(), "{ip}");
        }
        assert_eq!(class("::ffff:8.8.8.8"), AddressClass::Global);
        assert_eq!(class("2002:0808:0808::1"), AddressClass::Global);
    }

    #[test]
    fn never_a_host() {
        let open = AddressPolicy { allow_internal: true };
        for ip in ["0.0.0.0", "0.1.2.3", "255.255.255.255", "224.0.0.1", "239.1.1.1", "::", "ff02::1", "::ffff:0.0.0.0"]
        {
            assert!(matches!(class(ip), AddressClass::Never(_)), "{ip}: {:?}", class(ip));
            assert!(open.check(ip.parse().expect("ip")).is_err(), "{ip}");
        }
    }
}
