//! Connect-time authentication: HS256 JWT verification and minting, and what a verified
//! token gives a socket (its `user_id` assign and socket id). Knows nothing of HTTP.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::protocol::SOCKET_ID_PREFIX;

/// Longest `user_id` a token may carry, as written (a string's characters, an integer's
/// digits): it becomes a socket id and a PubSub topic.
pub const MAX_USER_ID_BYTES: usize = 255;

/// Claims Cinder reads from a connect token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user: a string or an integer, kept exactly as written (an integer past u64 is
    /// not rounded). Becomes the `user_id` assign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Box<RawValue>>,
    /// Expiry, seconds since the epoch; required.
    pub exp: u64,
}

/// What a verified token tells about a socket.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// `user_socket:<user_id>` when the token has a user.
    pub socket_id: Option<String>,
    /// The initial assigns, a JSON object as text: `{"user_id": ...}` with the claim as
    /// the token wrote it.
    pub assigns: String,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token in the params or subprotocols.
    #[error("missing token")]
    Missing,
    /// Bad signature, malformed, expired, not yet valid (`nbf`), or wrong algorithm.
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    /// The header lists extensions (`crit`) this server does not implement (RFC 7515
    /// 4.1.11: such a token must be refused).
    #[error("invalid token: critical header extensions {0:?} are not supported")]
    Critical(Vec<String>),
    /// `exp` is further away than the configured longest lifetime.
    #[error("invalid token: it expires more than {0} s from now (max_token_lifetime_secs)")]
    TooLong(u64),
    /// The `user_id` claim is neither a string nor an integer, or is too long.
    #[error("user_id claim must be a string or an integer of at most {MAX_USER_ID_BYTES} bytes")]
    BadUserId,
}

/// Verifies connect tokens.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    max_lifetime_secs: u64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Verifier {
    /// A verifier for HS256 tokens signed with `secret`, valid at most `max_lifetime_secs`
    /// from now.
    pub fn hs256(secret: &str, max_lifetime_secs: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_nbf = true;
        Verifier {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            max_lifetime_secs,
        }
    }

    /// Checks a token and returns the identity it proves.
    pub fn verify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?;
        if let Some(crit) = data.header.crit {
            return Err(AuthError::Critical(crit));
        }
        let claims = data.claims;
        if claims.exp.saturating_sub(now_secs()) > self.max_lifetime_secs {
            return Err(AuthError::TooLong(self.max_lifetime_secs));
        }
        let Some(user_id) = claims.user_id else {
            return Ok(Identity {
                socket_id: None,
                assigns: "{}".into(),
            });
        };
        let raw = user_id.get();
        if raw.len() > MAX_USER_ID_BYTES + 2 {
            return Err(AuthError::BadUserId);
        }
        let id = match serde_json::from_str::<Value>(raw) {
            Ok(Value::String(s)) if s.len() <= MAX_USER_ID_BYTES => s,
            // An integer as written: digits, perhaps a minus; never a float's rounding.
            Ok(Value::Number(_)) if is_integer(raw) => raw.to_owned(),
            _ => return Err(AuthError::BadUserId),
        };
        Ok(Identity {
            socket_id: Some(format!("{SOCKET_ID_PREFIX}{id}")),
            assigns: format!("{{\"user_id\":{raw}}}"),
        })
    }
}

/// Whether `raw` is a JSON integer literal.
fn is_integer(raw: &str) -> bool {
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Mints an HS256 token for `user_id`, valid for `ttl_secs`.
pub fn mint(secret: &str, user_id: &str, ttl_secs: u64) -> Result<String, AuthError> {
    let user_id = RawValue::from_string(Value::String(user_id.to_owned()).to_string())
        .map_err(|e| AuthError::Invalid(e.into()))?;
    let claims = Claims {
        user_id: Some(user_id),
        exp: now_secs() + ttl_secs,
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn verifier() -> Verifier {
        Verifier::hs256("s3cret", DAY)
    }

    fn signed(header: &Header, claims: &Value) -> String {
        jsonwebtoken::encode(header, claims, &EncodingKey::from_secret(b"s3cret")).expect("mints")
    }

    #[test]
    fn a_minted_token_verifies_and_names_the_socket() {
        let token = mint("s3cret", "42", 60).expect("mints");
        let id = verifier().verify(Some(&token)).expect("verifies");
        assert_eq!(id.socket_id.as_deref(), Some("user_socket:42"));
        assert_eq!(id.assigns, r#"{"user_id":"42"}"#);
    }

    #[test]
    fn forged_malformed_missing_and_expired_tokens_are_refused() {
        let v = verifier();
        let forged = mint("other", "42", 60).expect("mints");
        assert!(matches!(
            v.verify(Some(&forged)),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            v.verify(Some("garbage")),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(v.verify(None), Err(AuthError::Missing)));
        assert!(matches!(v.verify(Some("")), Err(AuthError::Missing)));
        let expired = signed(
            &Header::default(),
            &serde_json::json!({"user_id": 1, "exp": 1000}),
        );
        assert!(matches!(
            v.verify(Some(&expired)),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn tokens_not_yet_valid_with_critical_extensions_or_too_long_lived_are_refused() {
        let v = verifier();
        let now = now_secs();
        let later = signed(
            &Header::default(),
            &serde_json::json!({"user_id": 1, "exp": now + 60, "nbf": now + DAY}),
        );
        assert!(matches!(v.verify(Some(&later)), Err(AuthError::Invalid(_))));
        let header = Header {
            crit: Some(vec!["exp".into()]),
            ..Header::default()
        };
        let crit = signed(&header, &serde_json::json!({"user_id": 1, "exp": now + 60}));
        assert!(matches!(v.verify(Some(&crit)), Err(AuthError::Critical(_))));
        let endless = signed(
            &Header::default(),
            &serde_json::json!({"user_id": 1, "exp": u64::MAX}),
        );
        assert!(matches!(
            v.verify(Some(&endless)),
            Err(AuthError::TooLong(DAY))
        ));
        let now_valid = signed(
            &Header::default(),
            &serde_json::json!({"user_id": 1, "exp": now + 60, "nbf": now - 1}),
        );
        assert!(v.verify(Some(&now_valid)).is_ok());
    }

    #[test]
    fn user_ids_stay_exact_integers_or_strings() {
        let v = verifier();
        let exp = now_secs() + 60;
        // The claims as written: a Value would round a big integer before it is signed.
        let token = |id: &str| {
            let claims = Claims {
                user_id: Some(RawValue::from_string(id.to_owned()).expect("json")),
                exp,
            };
            jsonwebtoken::encode(
                &Header::default(),
                &claims,
                &EncodingKey::from_secret(b"s3cret"),
            )
            .expect("mints")
        };
        // serde_json's Value would read both as the same float: the raw text is kept.
        let big = v
            .verify(Some(&token("18446744073709551616")))
            .expect("verifies");
        let bigger = v
            .verify(Some(&token("18446744073709551617")))
            .expect("verifies");
        assert_eq!(
            big.socket_id.as_deref(),
            Some("user_socket:18446744073709551616")
        );
        assert_ne!(big.socket_id, bigger.socket_id);
        assert_eq!(big.assigns, r#"{"user_id":18446744073709551616}"#);
        let small = v.verify(Some(&token("7"))).expect("verifies");
        assert_eq!(small.socket_id.as_deref(), Some("user_socket:7"));
        for bad in ["1.5", "1e3", "-0.0", "true", "[1]", "{}"] {
            assert!(
                matches!(v.verify(Some(&token(bad))), Err(AuthError::BadUserId)),
                "{bad}"
            );
        }
        let long = format!("\"{}\"", "x".repeat(MAX_USER_ID_BYTES + 1));
        assert!(matches!(
            v.verify(Some(&token(&long))),
            Err(AuthError::BadUserId)
        ));
    }
}
