//! Join tokens, in the manner of k3s and Consul: a token pins the cluster CA's SHA-256 (so the
//! joining node can check the coordinator before it sends anything) and carries a secret that the
//! coordinator can check without keeping a list: an HMAC over the role and expiry, keyed by the
//! cluster key every coordinator holds.
//!
//! Text form: `gantry1.<ca sha256 hex>.<role>.<expires unix s>.<nonce hex>.<mac hex>`.

use crate::messages::Role;
use ring::hmac;

const PREFIX: &str = "gantry1";
const NONCE_BYTES: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("join token is malformed: {0}")]
    Malformed(String),
    #[error("join token was not issued by this cluster (its signature does not match)")]
    BadSignature,
    #[error("join token expired at unix time {expired_unix_s} ({ago_s} s ago)")]
    Expired { expired_unix_s: u64, ago_s: u64 },
    #[error("join token is for role {token_role}, not {wanted_role}: create one with --role {wanted_role}")]
    WrongRole { token_role: Role, wanted_role: Role },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_sha256_hex: String,
    pub role: Role,
    pub expires_unix_s: u64,
    nonce: [u8; NONCE_BYTES],
    mac: Vec<u8>,
}

fn signed_message(ca_sha256_hex: &str, role: Role, expires_unix_s: u64, nonce: &[u8]) -> String {
    format!(
        "{PREFIX}.{ca_sha256_hex}.{role}.{expires_unix_s}.{}",
        hex::encode(nonce)
    )
}

impl JoinToken {
    /// Mints a token. `cluster_key` is the secret every coordinator of the cluster holds.
    pub fn mint(cluster_key: &[u8], ca_sha256_hex: &str, role: Role, expires_unix_s: u64) -> Self {
        let mut nonce = [0u8; NONCE_BYTES];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .expect("the system random source works");
        let key = hmac::Key::new(hmac::HMAC_SHA256, cluster_key);
        let message = signed_message(ca_sha256_hex, role, expires_unix_s, &nonce);
        let mac = hmac::sign(&key, message.as_bytes()).as_ref().to_vec();
        Self {
            ca_sha256_hex: ca_sha256_hex.to_string(),
            role,
            expires_unix_s,
            nonce,
            mac,
        }
    }

    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        let [prefix, ca, role, expires, nonce, mac] = parts.as_slice() else {
            return Err(TokenError::Malformed(format!(
                "expected 6 dot-separated parts, found {}",
                parts.len()
            )));
        };
        if *prefix != PREFIX {
            return Err(TokenError::Malformed(format!(
                "expected it to start with {PREFIX:?}, found {prefix:?}"
            )));
        }
        if ca.len() != 64 || hex::decode(ca).is_err() {
            return Err(TokenError::Malformed("CA hash is not 64 hex digits".into()));
        }
        let role = role.parse::<Role>().map_err(TokenError::Malformed)?;
        let expires_unix_s = expires
            .parse::<u64>()
            .map_err(|_| TokenError::Malformed(format!("expiry {expires:?} is not a number")))?;
        let nonce: [u8; NONCE_BYTES] = hex::decode(nonce)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| TokenError::Malformed("nonce is not 32 hex digits".into()))?;
        let mac =
            hex::decode(mac).map_err(|_| TokenError::Malformed("secret is not hex".into()))?;
        Ok(Self {
            ca_sha256_hex: ca.to_string(),
            role,
            expires_unix_s,
            nonce,
            mac,
        })
    }

    /// Checks, in this order, that the cluster issued it, that it has not expired, and that it is
    /// for `wanted_role`.
    pub fn verify(
        &self,
        cluster_key: &[u8],
        now_unix_s: u64,
        wanted_role: Role,
    ) -> Result<(), TokenError> {
        let key = hmac::Key::new(hmac::HMAC_SHA256, cluster_key);
        let message = signed_message(
            &self.ca_sha256_hex,
            self.role,
            self.expires_unix_s,
            &self.nonce,
        );
        hmac::verify(&key, message.as_bytes(), &self.mac).map_err(|_| TokenError::BadSignature)?;
        if now_unix_s >= self.expires_unix_s {
            return Err(TokenError::Expired {
                expired_unix_s: self.expires_unix_s,
                ago_s: now_unix_s - self.expires_unix_s,
            });
        }
        if self.role != wanted_role {
            return Err(TokenError::WrongRole {
                token_role: self.role,
                wanted_role,
            });
        }
        Ok(())
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let message = signed_message(
            &self.ca_sha256_hex,
            self.role,
            self.expires_unix_s,
            &self.nonce,
        );
        write!(f, "{message}.{}", hex::encode(&self.mac))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &str = "8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4";

    #[test]
    fn a_minted_token_parses_and_verifies() {
        let token = JoinToken::mint(b"key", CA, Role::Agent, 2_000);
        let parsed = JoinToken::parse(&token.to_string()).unwrap();
        assert_eq!(parsed, token);
        parsed.verify(b"key", 1_999, Role::Agent).unwrap();
    }

    #[test]
    fn each_refusal_says_which() {
        let token = JoinToken::mint(b"key", CA, Role::Agent, 2_000);
        assert_eq!(
            token.verify(b"other", 1_000, Role::Agent),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            token.verify(b"key", 2_010, Role::Agent),
            Err(TokenError::Expired {
                expired_unix_s: 2_000,
                ago_s: 10
            })
        );
        assert_eq!(
            token.verify(b"key", 1_000, Role::Coordinator),
            Err(TokenError::WrongRole {
                token_role: Role::Agent,
                wanted_role: Role::Coordinator
            })
        );
    }

    #[test]
    fn tampering_with_any_field_breaks_the_signature() {
        let text = JoinToken::mint(b"key", CA, Role::Agent, 2_000).to_string();
        let tampered = text
            .replace(".agent.", ".coordinator.")
            .replace(".2000.", ".9999.");
        let parsed = JoinToken::parse(&tampered).unwrap();
        assert_eq!(
            parsed.verify(b"key", 1_000, Role::Coordinator),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn malformed_tokens_say_what_is_wrong() {
        for (text, needle) in [
            ("", "6 dot-separated parts"),
            ("k10.a.b.c.d.e", "start with"),
            ("gantry1.abc.agent.1.00.00", "64 hex digits"),
        ] {
            let err = JoinToken::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
