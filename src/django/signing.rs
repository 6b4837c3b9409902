//! `django.core.signing` as far as sessions need it: verifying a `TimestampSigner` value signed
//! with SHA-256 (Django 3.1+) against `SECRET_KEY` and its fallbacks, its age, and decoding its
//! (possibly zlib-compressed) JSON payload. Nothing here signs.

use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::{Map as JsonMap, Value as Json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::DjangoError;

/// Most bytes a compressed payload may inflate to.
const MAX_INFLATED: u64 = 16 * 1024 * 1024;

/// `django.utils.crypto.salted_hmac` with SHA-256.
pub(crate) fn salted_hmac(salt: &str, secret: &str, value: &[u8]) -> Vec<u8> {
    let key = Sha256::digest(format!("{salt}{secret}").as_bytes());
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&key) else {
        return Vec::new();
    };
    mac.update(value);
    mac.finalize().into_bytes().to_vec()
}

fn b62_decode(s: &str) -> Option<i64> {
    const DIGITS: &str = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let (sign, digits) = match s.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, s),
    };
    let mut n: i64 = 0;
    for c in digits.chars() {
        let d = i64::try_from(DIGITS.find(c)?).ok()?;
        n = n.checked_mul(62)?.checked_add(d)?;
    }
    Some(sign * n)
}

/// `django.core.signing.loads` for a `TimestampSigner` with SHA-256 (Django 3.1+): checks the
/// signature against each secret, the age when `max_age` is given, then decodes (and inflates)
/// the JSON payload.
pub fn verify_signed(
    signed: &str,
    salt: &str,
    secrets: &[&str],
    max_age: Option<Duration>,
) -> Result<JsonMap<String, Json>, DjangoError> {
    let (value, signature) = signed.rsplit_once(':').ok_or(DjangoError::NotSigned)?;
    let signer_salt = format!("{salt}signer");
    let ok = secrets.iter().any(|secret| {
        let expected = URL_SAFE_NO_PAD.encode(salted_hmac(&signer_salt, secret, value.as_bytes()));
        bool::from(expected.as_bytes().ct_eq(signature.as_bytes()))
    });
    if !ok {
        return Err(DjangoError::BadSignature);
    }
    let malformed = DjangoError::MalformedSigned;
    let (payload, timestamp) = value.rsplit_once(':').ok_or(malformed("no timestamp"))?;
    if let Some(max_age) = max_age {
        let ts = b62_decode(timestamp).ok_or(malformed("bad timestamp"))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let age = i64::try_from(now).unwrap_or(i64::MAX).saturating_sub(ts);
        if age > i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX) {
            return Err(DjangoError::Expired);
        }
    }
    let (compressed, b64) = match payload.strip_prefix('.') {
        Some(rest) => (true, rest),
        None => (false, payload),
    };
    let mut data = URL_SAFE_NO_PAD
        .decode(b64.trim_end_matches('='))
        .map_err(|_| malformed("bad base64"))?;
    if compressed {
        let mut out = Vec::new();
        flate2::read::ZlibDecoder::new(&data[..])
            .take(MAX_INFLATED)
            .read_to_end(&mut out)
            .map_err(|_| malformed("bad zlib data"))?;
        data = out;
    }
    match serde_json::from_slice(&data).map_err(|_| malformed("bad JSON"))? {
        Json::Object(m) => Ok(m),
        _ => Err(DjangoError::NotADict),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::django::STORE_SALT;

    #[test]
    fn signed_values_verify_with_the_secret() {
        // signing.dumps({"a": 1}, key="s3cret", salt="django.contrib.sessions.SessionStore")
        // computed here the way Django does, then checked and tampered with.
        let payload = URL_SAFE_NO_PAD.encode(br#"{"a":1}"#);
        let value = format!("{payload}:1aBcDe");
        let sig = URL_SAFE_NO_PAD.encode(salted_hmac(
            &format!("{STORE_SALT}signer"),
            "s3cret",
            value.as_bytes(),
        ));
        let signed = format!("{value}:{sig}");
        let m = verify_signed(&signed, STORE_SALT, &["s3cret"], None).unwrap();
        assert_eq!(m.get("a"), Some(&Json::from(1)));
        assert!(verify_signed(&signed, STORE_SALT, &["other", "s3cret"], None).is_ok());
        assert!(matches!(
            verify_signed(&signed, STORE_SALT, &["wrong"], None),
            Err(DjangoError::BadSignature)
        ));
        let tampered = signed.replacen(&payload[..2], "ZZ", 1);
        assert!(verify_signed(&tampered, STORE_SALT, &["s3cret"], None).is_err());
        assert!(matches!(
            verify_signed(
                &signed,
                STORE_SALT,
                &["s3cret"],
                Some(Duration::from_secs(60))
            ),
            Err(DjangoError::Expired)
        ));
        assert!(matches!(
            verify_signed("no-colon", STORE_SALT, &["s3cret"], None),
            Err(DjangoError::NotSigned)
        ));
        // A signature one character short or long never verifies.
        let short = &signed[..signed.len() - 1];
        assert!(matches!(
            verify_signed(short, STORE_SALT, &["s3cret"], None),
            Err(DjangoError::BadSignature)
        ));
        let long = format!("{signed}A");
        assert!(matches!(
            verify_signed(&long, STORE_SALT, &["s3cret"], None),
            Err(DjangoError::BadSignature)
        ));
    }

    #[test]
    fn base62_timestamps() {
        assert_eq!(b62_decode("0"), Some(0));
        assert_eq!(b62_decode("z"), Some(61));
        assert_eq!(b62_decode("10"), Some(62));
        assert_eq!(b62_decode("-10"), Some(-62));
        assert_eq!(b62_decode("!"), None);
        assert_eq!(b62_decode("zzzzzzzzzzzzzzzz"), None);
    }
}
