//! The egress policy: which addresses the worker may connect to on a job's behalf.
//!
//! Jobs name URLs (tarballs, webhooks, registries, git remotes); a hostile job could name the
//! node's cloud metadata service or an internal admin port. Every such connection is checked
//! on the *resolved* address, after every redirect:
//!
//! * link-local (169.254.0.0/16, fe80::/10, which holds the common metadata addresses), other
//!   cloud metadata addresses, unspecified, multicast and broadcast: always refused;
//! * loopback (127.0.0.0/8, ::1): only with `egress.allow_loopback`;
//! * private ranges (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7): only with
//!   `egress.allow_private`.
//!
//! For HTTP, [`EgressPolicy::http_client`] installs a DNS resolver that drops refused addresses
//! and a redirect policy that checks IP-literal hosts (which reqwest never resolves). Other
//! transports (git) call [`EgressPolicy::resolve`] before connecting.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use url::{Host, Url};

use crate::error::{ErrorCode, JobError, Stage};

/// Redirects followed at most, per request.
pub const MAX_REDIRECTS: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EgressPolicy {
    pub allow_loopback: bool,
    pub allow_private: bool,
}

/// Why an address is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRefused {
    /// The host as the job named it (never with userinfo).
    pub host: String,
    pub reason: &'static str,
}

impl fmt::Display for EgressRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connection to {} refused by the egress policy: {}",
            self.host, self.reason
        )
    }
}

impl std::error::Error for EgressRefused {}

impl EgressRefused {
    pub fn into_job_error(self, stage: Stage) -> JobError {
        JobError::new(stage, ErrorCode::EgressRefused, self.to_string())
    }
}

impl EgressPolicy {
    pub fn from_config(config: &crate::config::EgressConfig) -> Self {
        EgressPolicy {
            allow_loopback: config.allow_loopback,
            allow_private: config.allow_private,
        }
    }

    /// `Err(reason)` when the address may not be contacted.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), &'static str> {
        let ip = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            },
            v4 => v4,
        };
        match classify(ip) {
            AddressClass::Public => Ok(()),
            AddressClass::Loopback if self.allow_loopback => Ok(()),
            AddressClass::Loopback => Err("loopback addresses are not allowed"),
            AddressClass::Private if self.allow_private => Ok(()),
            AddressClass::Private => Err("private addresses are not allowed"),
            AddressClass::AlwaysRefused(reason) => Err(reason),
        }
    }

    /// Checks a URL's host when it is an IP literal; names are checked when resolved.
    pub fn check_url(&self, url: &Url) -> Result<(), EgressRefused> {
        let ip = match url.host() {
            Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
            Some(Host::Domain(_)) => return Ok(()),
            None => {
                return Err(EgressRefused {
                    host: String::new(),
                    reason: "the URL has no host",
                })
            }
        };
        self.check_ip(ip).map_err(|reason| EgressRefused {
            host: url.host_str().unwrap_or_default().to_owned(),
            reason,
        })
    }

    /// Resolves `host` and keeps the addresses the policy allows; refuses when none is left.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((bare, port))
                .await
                .map_err(|e| ResolveError::Lookup {
                    host: bare.to_owned(),
                    message: e.to_string(),
                })?
                .collect(),
        };
        let mut first_reason = "the name has no address";
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match self.check_ip(a.ip()) {
                Ok(()) => true,
                Err(reason) => {
                    first_reason = reason;
                    false
                }
            })
            .collect();
        if allowed.is_empty() {
            return Err(ResolveError::Refused(EgressRefused {
                host: bare.to_owned(),
                reason: first_reason,
            }));
        }
        Ok(allowed)
    }

    /// Applies the policy to an HTTP client: resolved addresses are filtered, IP-literal hosts
    /// are checked at the first request (call [`check_url`](Self::check_url)) and on every
    /// redirect, a redirect from `https` to plain `http` is refused, and at most
    /// [`MAX_REDIRECTS`] redirects are followed. No system proxy is used.
    pub fn http_client(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        let policy = *self;
        builder
            .dns_resolver(Arc::new(PolicyResolver { policy }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error(RedirectLimit);
                }
                let checked = check_redirect(attempt.previous(), attempt.url())
                    .and_then(|()| policy.check_url(attempt.url()));
                match checked {
                    Ok(()) => attempt.follow(),
                    Err(refused) => attempt.error(refused),
                }
            }))
            .no_proxy()
    }
}

/// The redirect policy of a client that talks only to hosts the node's configuration names
/// (the destination registry): no egress check, but no downgrade either.
pub fn configured_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            return attempt.error(RedirectLimit);
        }
        match check_redirect(attempt.previous(), attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(refused) => attempt.error(refused),
        }
    })
}

/// Refuses a redirect to plain `http` once any URL of the chain was `https`: what TLS
/// protected (credentials, the content's integrity) must not continue in the clear.
pub fn check_redirect(previous: &[Url], next: &Url) -> Result<(), EgressRefused> {
    let was_tls = previous.iter().any(|u| u.scheme() == "https");
    if was_tls && next.scheme() == "http" {
        return Err(EgressRefused {
            host: next.host_str().unwrap_or_default().to_owned(),
            reason: "a redirect from https:// to plain http:// is refused",
        });
    }
    Ok(())
}

/// A name that did not resolve, or resolved only to refused addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    Lookup { host: String, message: String },
    Refused(EgressRefused),
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::Lookup { host, message } => write!(f, "cannot resolve {host}: {message}"),
            ResolveError::Refused(r) => r.fmt(f),
        }
    }
}

impl std::error::Error for ResolveError {}

impl ResolveError {
    /// A refusal is permanent; a failed lookup is transient (DNS may recover).
    pub fn into_job_error(self, stage: Stage) -> JobError {
        match self {
            ResolveError::Refused(r) => r.into_job_error(stage),
            lookup @ ResolveError::Lookup { .. } => {
                JobError::transient(stage, ErrorCode::Unavailable, lookup.to_string())
            }
        }
    }
}

#[derive(Debug)]
struct RedirectLimit;

impl fmt::Display for RedirectLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "more than {MAX_REDIRECTS} redirects")
    }
}

impl std::error::Error for RedirectLimit {}

/// The egress refusal inside a reqwest error, if that is what stopped the request.
pub fn refusal_in<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a EgressRefused> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<EgressRefused>() {
            return Some(r);
        }
        if let Some(ResolveError::Refused(r)) = e.downcast_ref::<ResolveError>() {
            return Some(r);
        }
        cur = e.source();
    }
    None
}

struct PolicyResolver {
    policy: EgressPolicy,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = policy.resolve(&host, 0).await?;
            let iter: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(iter)
        })
    }
}

enum AddressClass {
    Public,
    Loopback,
    Private,
    AlwaysRefused(&'static str),
}

fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let o = ip.octets();
    if ip.is_link_local() {
        // 169.254.169.254 (AWS, GCP, Azure, OpenStack metadata) lies here.
        AddressClass::AlwaysRefused("link-local and cloud metadata addresses are never allowed")
    } else if o == [100, 100, 100, 200] || o == [192, 0, 0, 192] {
        // Alibaba Cloud and Oracle Cloud metadata.
        AddressClass::AlwaysRefused("cloud metadata addresses are never allowed")
    } else if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || o[0] == 0 {
        AddressClass::AlwaysRefused(
            "unspecified, broadcast and multicast addresses are never allowed",
        )
    } else if ip.is_loopback() {
        AddressClass::Loopback
    } else if ip.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
        // RFC 1918, and RFC 6598 shared address space (carrier-grade NAT, often internal).
        AddressClass::Private
    } else {
        AddressClass::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    let seg = ip.segments();
    if (seg[0] & 0xffc0) == 0xfe80 {
        AddressClass::AlwaysRefused("link-local addresses are never allowed")
    } else if seg[0] == 0xfd00 && seg[1] == 0x0ec2 {
        // AWS's IPv6 metadata endpoint fd00:ec2::254.
        AddressClass::AlwaysRefused("cloud metadata addresses are never allowed")
    } else if ip.is_unspecified() || ip.is_multicast() {
        AddressClass::AlwaysRefused("unspecified and multicast addresses are never allowed")
    } else if ip.is_loopback() {
        AddressClass::Loopback
    } else if (seg[0] & 0xfe00) == 0xfc00 || (seg[0] & 0xffc0) == 0xfec0 {
        // Unique local (fc00::/7) and deprecated site-local (fec0::/10).
        AddressClass::Private
    } else {
        AddressClass::Public
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: EgressPolicy = EgressPolicy {
        allow_loopback: false,
        allow_private: false,
    };
    const OPEN: EgressPolicy = EgressPolicy {
        allow_loopback: true,
        allow_private: true,
    };

    #[test]
    fn a_redirect_from_https_to_http_is_refused_anywhere_in_the_chain() {
        let url = |s: &str| Url::parse(s).unwrap();
        let refused =
            check_redirect(&[url("https://a.example/x")], &url("http://b.example/y")).unwrap_err();
        assert_eq!(refused.host, "b.example");
        assert!(
            refused.to_string().contains("https:// to plain http://"),
            "{refused}"
        );
        // Later in the chain too.
        assert!(check_redirect(
            &[url("https://a.example/"), url("https://b.example/")],
            &url("http://c.example/")
        )
        .is_err());
        for (previous, next) in [
            ("http://a.example/", "http://b.example/"),
            ("http://a.example/", "https://b.example/"),
            ("https://a.example/", "https://b.example/"),
        ] {
            assert_eq!(
                check_redirect(&[url(previous)], &url(next)),
                Ok(()),
                "{previous} → {next}"
            );
        }
    }

    #[test]
    fn address_table() {
        // (address, allowed by STRICT, allowed by OPEN)
        let cases = [
            ("93.184.216.34", true, true),
            ("2606:2800:220:1::1", true, true),
            ("127.0.0.1", false, true),
            ("127.5.6.7", false, true),
            ("::1", false, true),
            ("::ffff:127.0.0.1", false, true),
            ("10.1.2.3", false, true),
            ("172.16.0.1", false, true),
            ("172.32.0.1", true, true),
            ("192.168.1.1", false, true),
            ("100.64.0.1", false, true),
            ("fd12::1", false, true),
            ("169.254.169.254", false, false),
            ("169.254.1.1", false, false),
            ("::ffff:169.254.169.254", false, false),
            ("fe80::1", false, false),
            ("fd00:ec2::254", false, false),
            ("100.100.100.200", false, false),
            ("0.0.0.0", false, false),
            ("::", false, false),
            ("255.255.255.255", false, false),
            ("224.0.0.1", false, false),
        ];
        for (addr, strict, open) in cases {
            let ip: IpAddr = addr.parse().unwrap();
            assert_eq!(STRICT.check_ip(ip).is_ok(), strict, "{addr} strict");
            assert_eq!(OPEN.check_ip(ip).is_ok(), open, "{addr} open");
        }
    }

    #[test]
    fn ip_literal_urls_are_checked_names_are_deferred() {
        let refused = STRICT
            .check_url(&Url::parse("http://169.254.169.254/latest/meta-data").unwrap())
            .unwrap_err();
        assert!(refused.to_string().contains("169.254.169.254"), "{refused}");
        assert!(STRICT
            .check_url(&Url::parse("http://[::1]:8080/").unwrap())
            .is_err());
        assert!(STRICT
            .check_url(&Url::parse("https://example.com/").unwrap())
            .is_ok());
    }

    #[tokio::test]
    async fn resolve_refuses_names_that_resolve_only_to_refused_addresses() {
        let err = STRICT.resolve("localhost", 80).await.unwrap_err();
        assert!(matches!(err, ResolveError::Refused(_)), "{err}");
        let addrs = OPEN.resolve("localhost", 80).await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()));
    }

    #[tokio::test]
    async fn http_client_refuses_a_redirect_to_metadata() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = sock.read(&mut buf).await;
            let _ = sock
                .write_all(
                    b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/latest/meta-data\r\nContent-Length: 0\r\n\r\n",
                )
                .await;
        });
        let policy = EgressPolicy {
            allow_loopback: true,
            allow_private: false,
        };
        let client = policy
            .http_client(reqwest::Client::builder())
            .build()
            .unwrap();
        let err = client
            .get(format!("http://localhost:{}/a.tar.gz", addr.port()))
            .send()
            .await
            .unwrap_err();
        let refused = refusal_in(&err).expect("an egress refusal");
        assert_eq!(refused.host, "169.254.169.254");
    }

    #[tokio::test]
    async fn http_client_refuses_loopback_names_when_not_allowed() {
        let client = STRICT
            .http_client(reqwest::Client::builder())
            .build()
            .unwrap();
        let err = client.get("http://localhost:9/").send().await.unwrap_err();
        assert!(refusal_in(&err).is_some(), "{err:?}");
    }
}
