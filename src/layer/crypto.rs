//! Encryption of the messages stored in Redis, compatible with channels_redis'
//! `symmetric_encryption_keys`: every payload (the msgpack map, `__asgi_channel__` included) is
//! written as a Fernet token after the 12 random member bytes, and read back through the same keys.
//!
//! channels_redis 4.x derives each Fernet key as `base64url(sha256(key.encode("utf8")))` and uses
//! a `MultiFernet`: the first key encrypts, every key is tried to decrypt (key rotation: add the new
//! key first, keep the old one until no message written with it can still be in Redis). It reads
//! with `ttl = expiry + 10` seconds, and so does this module: a token older than that is refused
//! as Python would refuse it. Without the keys the stored bytes are a Fernet token, not msgpack.

use sha2::{Digest, Sha256};
use thiserror::Error;

/// What turning keys into a crypter can fail with.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CryptoError {
    /// `symmetric_encryption_keys` was given but held no key.
    #[error("symmetric encryption needs at least one non-empty key")]
    NoKey,
    /// A token none of the keys decrypts (wrong key, tampered, or older than the ttl).
    #[error("a stored message could not be decrypted with any of the configured keys")]
    Undecryptable,
}

/// The MultiFernet of a layer: the first key encrypts, all of them decrypt.
#[derive(Clone)]
pub struct MessageCrypter {
    fernets: Vec<fernet::Fernet>,
}

impl std::fmt::Debug for MessageCrypter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("MessageCrypter")
            .field("keys", &self.fernets.len())
            .finish()
    }
}

/// The Fernet key channels_redis derives from one configured key: base64url (padded) of its
/// SHA-256.
pub fn derive_fernet_key(key: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE.encode(Sha256::digest(key.as_bytes()))
}

impl MessageCrypter {
    /// A crypter for channels_redis-style keys (any strings; the first one encrypts).
    pub fn new<S: AsRef<str>>(keys: &[S]) -> Result<Self, CryptoError> {
        let fernets: Vec<fernet::Fernet> = keys
            .iter()
            .map(AsRef::as_ref)
            .filter(|k| !k.is_empty())
            // A derived key is always 32 bytes of valid base64url, which Fernet::new accepts.
            .filter_map(|k| fernet::Fernet::new(&derive_fernet_key(k)))
            .collect();
        if fernets.is_empty() {
            return Err(CryptoError::NoKey);
        }
        Ok(MessageCrypter { fernets })
    }

    /// Number of keys (the first encrypts).
    pub fn key_count(&self) -> usize {
        self.fernets.len()
    }

    /// Appends the Fernet token of `plain` (ASCII, as Python's `Fernet.encrypt` returns) to `out`.
    pub fn encrypt_into(&self, plain: &[u8], out: &mut Vec<u8>) {
        // `new` guarantees at least one key.
        if let Some(first) = self.fernets.first() {
            out.extend_from_slice(first.encrypt(plain).as_bytes());
        }
    }

    /// The plaintext of `token`, trying every key; refused when older than `ttl_secs`.
    pub fn decrypt(&self, token: &[u8], ttl_secs: u64) -> Result<Vec<u8>, CryptoError> {
        let token = std::str::from_utf8(token).map_err(|_| CryptoError::Undecryptable)?;
        self.fernets
            .iter()
            .find_map(|f| f.decrypt_with_ttl(token, ttl_secs).ok())
            .ok_or(CryptoError::Undecryptable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_the_key_as_channels_redis_does() {
        // base64.urlsafe_b64encode(hashlib.sha256(b"secret").digest()) in Python.
        assert_eq!(
            derive_fernet_key("secret"),
            "K7gNU3sdo-OL0wNhqoVWhr3g6s1xYv72ol_pe_Unols="
        );
    }

    #[test]
    fn round_trips_and_rotates() {
        let old = MessageCrypter::new(&["old"]).unwrap();
        let rotated = MessageCrypter::new(&["new", "old"]).unwrap();
        let mut token = Vec::new();
        old.encrypt_into(b"\x81\xa1a\x01", &mut token);
        assert!(token.starts_with(b"gAAAAA"), "a Fernet token, version 0x80");
        assert_eq!(rotated.decrypt(&token, 70).unwrap(), b"\x81\xa1a\x01");
        let mut newer = Vec::new();
        rotated.encrypt_into(b"x", &mut newer);
        assert_eq!(
            old.decrypt(&newer, 70),
            Err(CryptoError::Undecryptable),
            "the first key encrypts"
        );
        assert_eq!(
            MessageCrypter::new(&["other"]).unwrap().decrypt(&token, 70),
            Err(CryptoError::Undecryptable)
        );
        assert_eq!(
            old.decrypt(b"\x81\xa1a\x01", 70),
            Err(CryptoError::Undecryptable)
        );
    }

    #[test]
    fn refuses_no_key() {
        assert_eq!(
            MessageCrypter::new::<&str>(&[]).unwrap_err(),
            CryptoError::NoKey
        );
        assert_eq!(MessageCrypter::new(&[""]).unwrap_err(), CryptoError::NoKey);
    }
}
