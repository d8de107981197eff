//! Fetching `http(s)://` image URLs (`--image-fetch`), without becoming an SSRF proxy into the
//! cluster's network:
//!
//! - the host name is resolved once, by our resolver, which keeps only the addresses the policy
//!   allows ([`AddressPolicy`]); the connection goes to one of those addresses and nowhere else, so
//!   a name that resolves to 127.0.0.1 is refused and DNS rebinding (a second lookup that answers
//!   differently) has nothing to act on. A URL whose host is an IP literal is checked directly (the
//!   connector does not resolve those);
//! - no proxy from the environment (a proxy would resolve the name itself);
//! - at most [`MAX_REDIRECTS`] redirects, each to `http` or `https` only and each checked like the
//!   first URL (its literal address here, its name by the resolver when it connects);
//! - one deadline for the whole fetch (connect, redirects, body), and the body counted while it
//!   streams: the fetch stops at the first chunk past the byte limit, and a `Content-Length` over
//!   the limit stops it before any of the body is read.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::{Url, redirect};

use crate::images::address::AddressPolicy;

/// Redirects followed per fetch.
pub const MAX_REDIRECTS: usize = 3;

/// Settings of `--image-fetch`.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchConfig {
    /// The whole fetch of one image: connection, redirects and body.
    pub timeout: Duration,
    /// `--image-fetch-allow-private`: loopback, private, link-local and unique-local hosts too.
    pub allow_private: bool,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig { timeout: Duration::from_secs(10), allow_private: false }
    }
}

/// Why a URL was not fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The policy forbids it (address, scheme, too many redirects): the client asked for something
    /// this server will not do.
    #[error("{0}")]
    Refused(String),
    #[error("the image at the URL is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("fetching the image took longer than {} s", .0.as_secs_f64())]
    Timeout(Duration),
    /// The server could not be reached, or did not answer with the image.
    #[error("{0}")]
    Failed(String),
}

/// A refusal raised inside reqwest (by our resolver or redirect policy), found again in the error's
/// source chain.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refusal(String);

#[derive(Debug)]
pub struct UrlFetcher {
    client: reqwest::Client,
    policy: AddressPolicy,
    timeout: Duration,
    max_bytes: usize,
}

impl UrlFetcher {
    pub fn new(config: &FetchConfig, max_bytes: usize) -> Result<Self, reqwest::Error> {
        let policy = AddressPolicy { allow_internal: config.allow_private };
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(CheckedResolver { policy }))
            .redirect(redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > MAX_REDIRECTS {
                    return attempt.error(Refusal(format!("more than {MAX_REDIRECTS} redirects")));
                }
                match check_url(attempt.url(), policy) {
                    Ok(()) => attempt.follow(),
                    Err(why) => {
                        let to = redacted(attempt.url());
                        attempt.error(Refusal(format!("redirect to {to}: {why}")))
                    }
                }
            }))
            .connect_timeout(config.timeout)
            .user_agent(concat!("epserve/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(UrlFetcher { client, policy, timeout: config.timeout, max_bytes })
    }

    /// The body at `url`, at most the byte limit, within the deadline.
    pub async fn fetch(&self, url: &Url) -> Result<Bytes, FetchError> {
        check_url(url, self.policy).map_err(FetchError::Refused)?;
        match tokio::time::timeout(self.timeout, self.fetch_unbounded(url)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout(self.timeout)),
        }
    }

    async fn fetch_unbounded(&self, url: &Url) -> Result<Bytes, FetchError> {
        let mut response = self.client.get(url.clone()).send().await.map_err(classify)?;
        let status = response.status();
        if status.is_redirection() {
            // reqwest hands back, unfollowed, a redirect whose target it will not even consider
            // (another scheme): say which.
            let target = response.headers().get(reqwest::header::LOCATION).and_then(|l| l.to_str().ok());
            let why = match target.map(|t| response.url().join(t)) {
                Some(Ok(to)) => {
                    let why = check_url(&to, self.policy).err().unwrap_or_else(|| "not followed".to_owned());
                    format!("redirect to {}: {why}", redacted(&to))
                }
                _ => format!("{status} without a usable Location"),
            };
            return Err(FetchError::Refused(why));
        }
        if !status.is_success() {
            return Err(FetchError::Failed(format!("the server answered {status}")));
        }
        if response.content_length().is_some_and(|n| n > self.max_bytes as u64) {
            return Err(FetchError::TooLarge { limit: self.max_bytes });
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > self.max_bytes {
                return Err(FetchError::TooLarge { limit: self.max_bytes });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }
}

/// What the first URL and every redirect must satisfy before a connection is made: `http` or
/// `https`, a host, and (for an IP literal, which is never resolved) an allowed address.
fn check_url(url: &Url, policy: AddressPolicy) -> Result<(), String> {
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(format!("the scheme '{other}' is not fetched (only http and https)")),
    }
    // The URL parser has already normalised numeric hosts (`http://2130706433/`, `http://0x7f.1/`)
    // to dotted IPv4, and writes IPv6 in brackets.
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or("the URL has no host")?;
    match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        Ok(ip) => policy.check(ip),
        Err(_) => Ok(()),
    }
}

/// A URL for messages: without credentials or query (which may hold tokens).
pub fn redacted(url: &Url) -> String {
    let host = url.host_str().unwrap_or("");
    match url.port() {
        Some(port) => format!("{}://{host}:{port}{}", url.scheme(), url.path()),
        None => format!("{}://{host}{}", url.scheme(), url.path()),
    }
}

/// Resolves with the system resolver, then keeps only the addresses the policy allows.
#[derive(Debug)]
struct CheckedResolver {
    policy: AddressPolicy,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy;
        let host = name.as_str().to_owned();
        let resolving = async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| -> BoxError { Box::new(Refusal(format!("{host} does not resolve: {e}"))) })?
                .collect();
            let (allowed, refused): (Vec<SocketAddr>, Vec<SocketAddr>) =
                resolved.into_iter().partition(|a| policy.check(a.ip()).is_ok());
            if allowed.is_empty() {
                let why: Vec<String> = refused.iter().filter_map(|a| policy.check(a.ip()).err()).collect();
                let why = if why.is_empty() { "no address".to_owned() } else { why.join("; ") };
                return Err(Box::new(Refusal(format!("{host} resolves to {why}"))) as BoxError);
            }
            Ok::<Addrs, BoxError>(Box::new(allowed.into_iter()))
        };
        Box::pin(resolving)
    }
}

/// A reqwest error as a fetch error: our refusals (from the resolver or the redirect policy) stay
/// refusals; anything else is a failure to fetch.
fn classify(error: reqwest::Error) -> FetchError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(e) = source {
        if let Some(refusal) = e.downcast_ref::<Refusal>() {
            return FetchError::Refused(refusal.0.clone());
        }
        source = e.source();
    }
    let what = if error.is_connect() {
        "could not connect"
    } else if error.is_timeout() {
        "timed out"
    } else if error.is_redirect() {
        "bad redirect"
    } else {
        "fetch failed"
    };
    // reqwest's message names the URL with its query; ours is already in the error's context.
    let detail = error.without_url().to_string();
    FetchError::Failed(format!("{what}: {detail}"))
}
