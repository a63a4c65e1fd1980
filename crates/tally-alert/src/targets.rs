//! Where webhooks may go. In keyed mode tenants are not trusted: a rule's
//! webhook must not make the server talk to internal addresses (cloud
//! metadata at 169.254.169.254, loopback, private networks). A target is
//! checked when the rule is written (an address in the URL) and again when
//! it is delivered: names are resolved by [`GuardedResolver`], which hands
//! the HTTP client only the allowed addresses, so a name that resolves to
//! an internal address (or is changed to, later) is never connected to.
//! Redirects are not followed. `alerts.allow-targets` lists hosts, addresses
//! and networks (`10.1.2.0/24`) that are allowed anyway.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// Which targets deliveries may reach.
#[derive(Debug, Clone, Default)]
pub struct TargetPolicy {
    /// Refuse internal addresses (keyed mode).
    pub block_internal: bool,
    /// Hosts, addresses and networks allowed even when internal.
    pub allow: Vec<Allowed>,
}

/// One entry of `alerts.allow-targets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    Host(String),
    Net(IpAddr, u8),
}

impl Allowed {
    /// `hooks.internal`, `10.0.0.7`, `10.0.0.0/8`, `fd00::/8`.
    pub fn parse(s: &str) -> Result<Allowed, String> {
        let s = s.trim();
        if let Some((ip, bits)) = s.split_once('/') {
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| format!("{s:?}: {ip:?} is not an IP address"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let bits: u8 = bits
                .parse()
                .ok()
                .filter(|&b| b <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0–{max}"))?;
            return Ok(Allowed::Net(ip, bits));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            let bits = if ip.is_ipv4() { 32 } else { 128 };
            return Ok(Allowed::Net(ip, bits));
        }
        if s.is_empty() || s.contains(['/', ':', ' ']) {
            return Err(format!(
                "{s:?}: write a host name, an IP address or a network like 10.0.0.0/8"
            ));
        }
        Ok(Allowed::Host(s.to_ascii_lowercase()))
    }

    fn covers_ip(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Allowed::Net(IpAddr::V4(n), bits), IpAddr::V4(a)) => {
                prefix_eq(u32::from(*n) as u128, u32::from(a) as u128, *bits, 32)
            }
            (Allowed::Net(IpAddr::V6(n), bits), IpAddr::V6(a)) => {
                prefix_eq(u128::from(*n), u128::from(a), *bits, 128)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, bits: u8, width: u8) -> bool {
    if bits == 0 {
        return true;
    }
    let shift = u32::from(width - bits.min(width));
    (a >> shift) == (b >> shift)
}

/// Loopback, private, link-local (cloud metadata), shared, unspecified,
/// multicast, broadcast and documentation addresses; IPv4 inside IPv6
/// judged as IPv4.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => internal_v4(a),
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return internal_v4(v4);
            }
            let s = a.segments();
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 of an IPv4 address
                || a == Ipv6Addr::UNSPECIFIED
        }
    }
}

fn internal_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    a.is_loopback()
        || a.is_private()
        || a.is_link_local()
        || a.is_unspecified()
        || a.is_broadcast()
        || a.is_multicast()
        || a.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // shared address space
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || o[0] >= 240 // reserved
}

impl TargetPolicy {
    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allow
            .iter()
            .any(|a| matches!(a, Allowed::Host(h) if *h == host))
    }

    /// Whether a connection to `ip` (for a URL naming `host`) is allowed.
    pub fn ip_allowed(&self, host: &str, ip: IpAddr) -> bool {
        !self.block_internal
            || !is_internal(ip)
            || self.host_allowed(host)
            || self.allow.iter().any(|a| a.covers_ip(ip))
    }

    /// Checks a URL when a rule is written: an internal address in it is
    /// refused at once (names are checked when they are resolved). The
    /// error says what and how to allow it.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), String> {
        if !self.block_internal {
            return Ok(());
        }
        let ip = match url.host() {
            Some(url::Host::Ipv4(a)) => IpAddr::V4(a),
            Some(url::Host::Ipv6(a)) => IpAddr::V6(a),
            Some(url::Host::Domain(d)) => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                if (d == "localhost" || d.ends_with(".localhost")) && !self.host_allowed(&d) {
                    return Err(format!(
                        "{d} is this machine: webhooks may not reach internal addresses (add it to alerts.allow-targets to allow it)"
                    ));
                }
                return Ok(());
            }
            None => return Err("the URL has no host".into()),
        };
        if self.ip_allowed(url.host_str().unwrap_or_default(), ip) {
            Ok(())
        } else {
            Err(format!(
                "{ip} is an internal address: webhooks may not reach loopback, private or link-local addresses (add it to alerts.allow-targets to allow it)"
            ))
        }
    }

    /// The address a URL names, when it names one (not a host name).
    pub fn literal_ip(url: &reqwest::Url) -> Option<IpAddr> {
        match url.host() {
            Some(url::Host::Ipv4(a)) => Some(IpAddr::V4(a)),
            Some(url::Host::Ipv6(a)) => Some(IpAddr::V6(a)),
            _ => None,
        }
    }
}

/// Resolves webhook hosts and keeps only the addresses the policy allows:
/// the client connects to nothing else, whatever the name resolves to.
pub struct GuardedResolver {
    pub policy: Arc<TargetPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| policy.ip_allowed(&host, a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err("the target resolves to no allowed address".into());
            }
            let it: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(it)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(allow: &[&str]) -> TargetPolicy {
        TargetPolicy {
            block_internal: true,
            allow: allow.iter().map(|a| Allowed::parse(a).unwrap()).collect(),
        }
    }

    #[test]
    fn internal_targets_are_refused_in_every_spelling() {
        let p = keyed(&[]);
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://127.0.0.1:7070/api/v1/query",
            "http://[::1]/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0/",
            "http://10.1.2.3/",
            "http://192.168.0.1/",
            "http://172.16.5.4/",
            "http://100.64.0.1/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://localhost:9000/hook",
            "http://api.localhost/",
        ] {
            let u = reqwest::Url::parse(url).unwrap();
            assert!(p.check_url(&u).is_err(), "{url}");
        }
        for url in [
            "https://hooks.slack.com/x",
            "http://93.184.216.34/",
            "https://[2606:4700::1]/",
        ] {
            let u = reqwest::Url::parse(url).unwrap();
            assert!(p.check_url(&u).is_ok(), "{url}");
        }
    }

    #[test]
    fn the_allow_list_opens_hosts_addresses_and_networks() {
        let p = keyed(&["10.0.0.0/8", "hooks.internal", "127.0.0.1", "fd00::/8"]);
        assert!(p.ip_allowed("x", "10.200.1.1".parse().unwrap()));
        assert!(
            !p.ip_allowed("x", "11.0.0.1".parse().unwrap())
                || !is_internal("11.0.0.1".parse().unwrap())
        );
        assert!(!p.ip_allowed("x", "192.168.1.1".parse().unwrap()));
        assert!(p.ip_allowed("hooks.internal", "192.168.1.1".parse().unwrap()));
        assert!(p.ip_allowed("x", "127.0.0.1".parse().unwrap()));
        assert!(!p.ip_allowed("x", "127.0.0.2".parse().unwrap()));
        assert!(p.ip_allowed("x", "fd12::5".parse().unwrap()));
        assert!(Allowed::parse("10.0.0.0/33").is_err());
        assert!(Allowed::parse("a b").is_err());
        // Open mode (loopback only) keeps local development working.
        let open = TargetPolicy::default();
        assert!(
            open.check_url(&reqwest::Url::parse("http://127.0.0.1:9000/hook").unwrap())
                .is_ok()
        );
    }

    /// A name that resolves to loopback is never connected to.
    #[tokio::test]
    async fn the_resolver_hands_out_only_allowed_addresses() {
        use reqwest::dns::Resolve;
        let r = GuardedResolver {
            policy: Arc::new(keyed(&[])),
        };
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        assert!(r.resolve(name).await.is_err());
        let open = GuardedResolver {
            policy: Arc::new(TargetPolicy::default()),
        };
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        assert!(open.resolve(name).await.is_ok());
    }
}
