//! What a connect must pass before a socket exists, on either transport (WebSocket,
//! LongPoll): the browser's origin against `check_origin` (Phoenix's rule), the serializer
//! the client asks for, its connect token, and the connects its user (or address) made
//! lately. Each refusal says why and carries the HTTP status it is answered with.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use axum::http::{HeaderMap, StatusCode, header};

use crate::auth::{Identity, Verifier};
use crate::config::Origin;
use crate::limit::{ConnectKey, Connects};
use crate::protocol::{self, Vsn};

/// The address a connection came from, put in every request's extensions by the accept
/// loop.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Why a connect was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The browser's page is not on an allowed origin.
    #[error("origin not allowed (check_origin)")]
    Origin,
    /// The `vsn` parameter names no serializer this server speaks.
    #[error("{0}")]
    Vsn(protocol::ProtocolError),
    /// The connect token.
    #[error("{0}")]
    Token(crate::auth::AuthError),
    /// The client connected too often lately; it may again in this many seconds.
    #[error("too many connects: retry in {0} s (connects_per_sec)")]
    TooOften(u64),
}

impl Refusal {
    /// The HTTP status it is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Origin | Refusal::Vsn(_) | Refusal::Token(_) => StatusCode::FORBIDDEN,
            Refusal::TooOften(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

/// The rules a connect passes, shared by the transports.
pub struct Admission {
    origins: Vec<Origin>,
    verifier: Verifier,
    connects: Connects,
}

impl Admission {
    /// Connects from `origins` (empty: any), with tokens `verifier` accepts, at most as
    /// often as `connects` allows.
    pub fn new(origins: &[String], verifier: Verifier, connects: Connects) -> Self {
        Admission {
            // Validated with the configuration.
            origins: origins
                .iter()
                .filter_map(|o| Origin::parse(o).ok())
                .collect(),
            verifier,
            connects,
        }
    }

    /// Whether the request's `Origin` may connect: always without a list, and for a
    /// request without the header (not a browser), as Phoenix does.
    pub fn check_origin(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if self.origins.is_empty() {
            return Ok(());
        }
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let allowed = origin
            .to_str()
            .ok()
            .and_then(|o| Origin::parse(o).ok())
            .is_some_and(|o| self.origins.iter().any(|allowed| allowed.allows(&o)));
        if allowed {
            Ok(())
        } else {
            Err(Refusal::Origin)
        }
    }

    /// The serializer and identity of a connect with these query `params` and `token`,
    /// from `peer`, counted against its user (or its address).
    pub fn admit(
        &self,
        params: &HashMap<String, String>,
        token: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<(Vsn, Identity), Refusal> {
        let vsn = Vsn::from_param(params.get(protocol::VSN_PARAM).map(String::as_str))
            .map_err(Refusal::Vsn)?;
        let verified = self.verifier.verify(token);
        let key = match (&verified, peer) {
            (
                Ok(Identity {
                    socket_id: Some(id),
                    ..
                }),
                _,
            ) => Some(ConnectKey::Socket(id.as_str().into())),
            (_, Some(ip)) => Some(ConnectKey::ip(ip)),
            (_, None) => None,
        };
        if let Some(key) = key {
            self.connects.take(key).map_err(Refusal::TooOften)?;
        }
        Ok((vsn, verified.map_err(Refusal::Token)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(list: &[&str], origin: &str) -> bool {
        let list: Vec<String> = list.iter().map(|s| (*s).to_owned()).collect();
        let admission = Admission::new(&list, Verifier::hs256("s", 60), Connects::new(1, 1));
        let mut headers = HeaderMap::new();
        headers.insert(header::ORIGIN, origin.parse().expect("header"));
        admission.check_origin(&headers).is_ok()
    }

    #[test]
    fn origins_match_as_phoenix_check_origin_does() {
        assert!(allowed(&[], "https://evil.example"));
        assert!(allowed(&["https://example.com"], "https://example.com"));
        assert!(allowed(&["https://example.com"], "https://EXAMPLE.com:443"));
        assert!(!allowed(&["https://example.com"], "http://example.com"));
        assert!(!allowed(
            &["https://example.com"],
            "https://example.com.evil.net"
        ));
        assert!(!allowed(&["https://example.com"], "null"));
        assert!(allowed(&["//example.com"], "http://example.com:8080"));
        assert!(!allowed(&["//example.com:4000"], "http://example.com:8080"));
        assert!(allowed(
            &["https://*.example.com"],
            "https://a.b.example.com"
        ));
        assert!(allowed(&["https://*.example.com"], "https://example.com"));
        assert!(!allowed(
            &["https://*.example.com"],
            "https://badexample.com"
        ));
        assert!(allowed(&["http://[::1]:4000"], "http://[::1]:4000"));
        assert!(allowed(&["http://[::1]"], "http://[::1]"));
        assert!(!allowed(&["http://[::1]"], "http://[::1]:4000"));
        // A scheme without a port is its default port, as Phoenix reads it.
        assert!(!allowed(
            &["https://example.com"],
            "https://example.com:8443"
        ));
        assert!(allowed(&["//example.com"], "https://example.com:8443"));
    }

    #[test]
    fn a_request_without_an_origin_is_not_a_browser_and_passes() {
        let list = vec!["https://example.com".to_owned()];
        let admission = Admission::new(&list, Verifier::hs256("s", 60), Connects::new(1, 1));
        assert!(admission.check_origin(&HeaderMap::new()).is_ok());
    }
}
