//! Connect-time authentication: HS256 JWT verification and minting, and what a verified
//! token gives a socket (its `user_id` assign and socket id). Knows nothing of HTTP.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Claims Cinder reads from a connect token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user; a string or a number. Becomes the `user_id` assign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Value>,
    /// Expiry, seconds since the epoch; required.
    pub exp: u64,
}

/// What a verified token tells about a socket.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// `user_socket:<user_id>` when the token has a user.
    pub socket_id: Option<String>,
    /// The initial assigns, a JSON object: `{"user_id": ...}`.
    pub assigns: serde_json::Map<String, Value>,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token in the params or subprotocols.
    #[error("missing token")]
    Missing,
    /// Bad signature, malformed, expired, or wrong algorithm.
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    /// The `user_id` claim is neither a string nor a number.
    #[error("user_id claim must be a string or a number")]
    BadUserId,
}

/// Verifies connect tokens.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    /// A verifier for HS256 tokens signed with `secret`.
    pub fn hs256(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        Verifier {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// Checks a token and returns the identity it proves.
    pub fn verify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?.claims;
        let mut assigns = serde_json::Map::new();
        let socket_id = match claims.user_id {
            None => None,
            Some(user_id) => {
                let id = match &user_id {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => return Err(AuthError::BadUserId),
                };
                assigns.insert("user_id".into(), user_id);
                Some(format!("user_socket:{id}"))
            }
        };
        Ok(Identity { socket_id, assigns })
    }
}

/// Mints an HS256 token for `user_id`, valid for `ttl_secs`.
pub fn mint(secret: &str, user_id: &str, ttl_secs: u64) -> Result<String, AuthError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = Claims {
        user_id: Some(Value::String(user_id.to_owned())),
        exp: now + ttl_secs,
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

    #[test]
    fn a_minted_token_verifies_and_names_the_socket() {
        let token = mint("s3cret", "42", 60).expect("mints");
        let id = Verifier::hs256("s3cret")
            .verify(Some(&token))
            .expect("verifies");
        assert_eq!(id.socket_id.as_deref(), Some("user_socket:42"));
        assert_eq!(id.assigns["user_id"], "42");
    }

    #[test]
    fn forged_malformed_missing_and_expired_tokens_are_refused() {
        let v = Verifier::hs256("s3cret");
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
        let claims = Claims {
            user_id: Some(Value::from(1)),
            exp: 1_000,
        };
        let expired = jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"s3cret"),
        )
        .expect("mints");
        assert!(matches!(
            v.verify(Some(&expired)),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn numeric_user_ids_are_kept_as_numbers() {
        let claims = Claims {
            user_id: Some(Value::from(7)),
            exp: u64::MAX / 2,
        };
        let token =
            jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(b"k"))
                .expect("mints");
        let id = Verifier::hs256("k").verify(Some(&token)).expect("verifies");
        assert_eq!(id.socket_id.as_deref(), Some("user_socket:7"));
        assert_eq!(id.assigns["user_id"], 7);
    }
}
