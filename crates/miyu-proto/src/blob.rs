//! The pieces of the HTTPS blob endpoints (PROTOCOL.md §8) that cross the wire as text: blob
//! ids, the `Authorization` header a device signs, and the `Range` header.
//!
//! A request is authenticated the way a WebSocket is: by a signature of the device key. Over
//! HTTP there is no connection-long challenge, so the device signs the request itself (method,
//! path, time and a fresh nonce) bound to the server's certificate; the server accepts a time
//! within [`MAX_CLOCK_SKEW_S`] of its own and each nonce once.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, VerifyingKey};

use crate::ids::DeviceId;
use crate::text;

/// What a request signature covers, after this prefix: the server certificate's SHA-256, the
/// method, a zero byte, the path with its query, a zero byte, the time (8 bytes, big-endian),
/// the nonce, a zero byte and the [`canonical_headers`].
pub const HTTP_AUTH_CONTEXT: &[u8] = b"miyu http auth v1";
/// The request headers a signature covers, in this order, when present: everything the
/// endpoints act on besides the method and path.
pub const SIGNED_HEADERS: [&str; 5] = [
    "miyu-group",
    "miyu-size",
    "miyu-expires",
    "upload-offset",
    "range",
];

/// The signed headers of a request as `name:value` lines, in [`SIGNED_HEADERS`] order. `get`
/// returns a header's value; a value that is not text (`Err`) makes the request unsignable.
pub fn canonical_headers<'a>(
    get: impl Fn(&str) -> Option<Result<&'a str, ()>>,
) -> Result<String, BlobError> {
    let mut canonical = String::new();
    for name in SIGNED_HEADERS {
        if let Some(value) = get(name) {
            let value = value.map_err(|()| BlobError::BadAuthorization)?;
            canonical.push_str(name);
            canonical.push(':');
            canonical.push_str(value.trim());
            canonical.push('\n');
        }
    }
    Ok(canonical)
}
/// How far a request's time may be from the server's clock, in seconds.
pub const MAX_CLOCK_SKEW_S: u64 = 300;
/// The header carrying the server's clock in a 401 answer, so a client with a wrong clock can
/// correct its time and retry.
pub const SERVER_TIME_HEADER: &str = "miyu-time";
/// Longest `Authorization` value accepted; longer ones are refused before parsing.
const MAX_AUTH_HEADER: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    #[error("a blob id is 52 base32 characters")]
    BadBlobId,
    #[error("malformed Authorization header")]
    BadAuthorization,
    #[error("malformed or unsatisfiable Range header")]
    BadRange,
}

/// A blob: 32 random bytes chosen by the server, unguessable.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlobId(pub [u8; 32]);

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&text::encode(&self.0))
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Ids are capabilities-in-part: never print a whole one into a log by accident.
        write!(f, "BlobId({}…)", &text::encode(&self.0)[..6])
    }
}

impl FromStr for BlobId {
    type Err = BlobError;
    fn from_str(s: &str) -> Result<Self, BlobError> {
        text::decode_array(s).map(Self).ok_or(BlobError::BadBlobId)
    }
}

/// A signed request: `Authorization: Miyu <device>.<time>.<nonce>.<signature>`, the binary
/// parts in lowercase base32.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAuth {
    pub device_id: DeviceId,
    /// Unix seconds on the device's clock (corrected by the server's, after a 401).
    pub time: u64,
    pub nonce: [u8; 16],
    pub signature: [u8; 64],
}

impl HttpAuth {
    /// The bytes a device key signs for one request.
    pub fn payload(
        server_certificate_sha256: &[u8; 32],
        method: &str,
        path_and_query: &str,
        time: u64,
        nonce: &[u8; 16],
        canonical_headers: &str,
    ) -> Vec<u8> {
        [
            HTTP_AUTH_CONTEXT,
            server_certificate_sha256,
            method.as_bytes(),
            &[0],
            path_and_query.as_bytes(),
            &[0],
            &time.to_be_bytes(),
            nonce,
            &[0],
            canonical_headers.as_bytes(),
        ]
        .concat()
    }

    pub fn to_header(&self) -> String {
        format!(
            "Miyu {}.{}.{}.{}",
            self.device_id,
            self.time,
            text::encode(&self.nonce),
            text::encode(&self.signature)
        )
    }

    pub fn parse(header: &str) -> Result<Self, BlobError> {
        if header.len() > MAX_AUTH_HEADER {
            return Err(BlobError::BadAuthorization);
        }
        let rest = header
            .strip_prefix("Miyu ")
            .ok_or(BlobError::BadAuthorization)?;
        let mut parts = rest.split('.');
        let mut next = || parts.next().ok_or(BlobError::BadAuthorization);
        let device_id = next()?.parse().map_err(|_| BlobError::BadAuthorization)?;
        let time_text = next()?;
        if time_text.is_empty()
            || time_text.len() > 20
            || !time_text.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(BlobError::BadAuthorization);
        }
        let time = time_text.parse().map_err(|_| BlobError::BadAuthorization)?;
        let nonce = text::decode_array(next()?).ok_or(BlobError::BadAuthorization)?;
        let signature = text::decode_array(next()?).ok_or(BlobError::BadAuthorization)?;
        if parts.next().is_some() {
            return Err(BlobError::BadAuthorization);
        }
        Ok(Self {
            device_id,
            time,
            nonce,
            signature,
        })
    }

    /// Checks the signature with the device's public key.
    pub fn verify(
        &self,
        device_key: &[u8; 32],
        server_certificate_sha256: &[u8; 32],
        method: &str,
        path_and_query: &str,
        canonical_headers: &str,
    ) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(device_key) else {
            return false;
        };
        key.verify_strict(
            &Self::payload(
                server_certificate_sha256,
                method,
                path_and_query,
                self.time,
                &self.nonce,
                canonical_headers,
            ),
            &Signature::from_bytes(&self.signature),
        )
        .is_ok()
    }
}

/// Parses a single-range `Range` header against a resource of `len` bytes: `bytes=A-B`,
/// `bytes=A-` or `bytes=-N`. Returns the first byte and the number of bytes.
pub fn parse_range(header: &str, len: u64) -> Result<(u64, u64), BlobError> {
    let spec = header
        .trim()
        .strip_prefix("bytes=")
        .ok_or(BlobError::BadRange)?;
    let (first, last) = spec.split_once('-').ok_or(BlobError::BadRange)?;
    let number = |text: &str| -> Result<u64, BlobError> {
        if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BlobError::BadRange);
        }
        text.parse().map_err(|_| BlobError::BadRange)
    };
    let (start, end_inclusive) = match (first.trim(), last.trim()) {
        ("", suffix) => {
            let suffix = number(suffix)?;
            if suffix == 0 || len == 0 {
                return Err(BlobError::BadRange);
            }
            (len.saturating_sub(suffix), len - 1)
        }
        (start, "") => (
            number(start)?,
            len.checked_sub(1).ok_or(BlobError::BadRange)?,
        ),
        (start, end) => (number(start)?, number(end)?.min(len.saturating_sub(1))),
    };
    if start >= len || end_inclusive < start {
        return Err(BlobError::BadRange);
    }
    Ok((start, end_inclusive - start + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    #[test]
    fn blob_ids_round_trip_and_hide_in_debug() {
        let id = BlobId([9; 32]);
        assert_eq!(id.to_string().parse::<BlobId>().unwrap(), id);
        assert!(!format!("{id:?}").contains(&id.to_string()));
        assert_eq!("abc".parse::<BlobId>(), Err(BlobError::BadBlobId));
    }

    #[test]
    fn signed_headers_verify_only_for_their_request() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let device_key = key.verifying_key().to_bytes();
        let server = [1u8; 32];
        let nonce = [5u8; 16];
        let headers =
            canonical_headers(|name| (name == "range").then_some(Ok("bytes=0-"))).unwrap();
        assert_eq!(headers, "range:bytes=0-\n");
        let payload = HttpAuth::payload(&server, "GET", "/v1/blobs/x", 1000, &nonce, &headers);
        let auth = HttpAuth {
            device_id: DeviceId::from_device_key(&device_key),
            time: 1000,
            nonce,
            signature: key.sign(&payload).to_bytes(),
        };
        let parsed = HttpAuth::parse(&auth.to_header()).unwrap();
        assert_eq!(parsed, auth);
        let x = "/v1/blobs/x";
        assert!(parsed.verify(&device_key, &server, "GET", x, &headers));
        assert!(!parsed.verify(&device_key, &server, "PATCH", x, &headers));
        assert!(!parsed.verify(&device_key, &server, "GET", "/v1/blobs/y", &headers));
        assert!(!parsed.verify(&device_key, &[2; 32], "GET", x, &headers));
        // Another range, or none, makes another request.
        assert!(!parsed.verify(&device_key, &server, "GET", x, "range:bytes=5-\n"));
        assert!(!parsed.verify(&device_key, &server, "GET", x, ""));
        let later = HttpAuth {
            time: 1001,
            ..parsed
        };
        assert!(!later.verify(&device_key, &server, "GET", x, &headers));
    }

    #[test]
    fn malformed_headers_are_refused() {
        for header in [
            "",
            "Bearer x",
            "Miyu ",
            "Miyu a.b.c.d",
            "Miyu aaaaaaaaaaaaaaaaaaaaaaaaaa.-1.x.y",
            &"Miyu ".repeat(100),
        ] {
            assert_eq!(
                HttpAuth::parse(header),
                Err(BlobError::BadAuthorization),
                "{header}"
            );
        }
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(parse_range("bytes=0-", 10), Ok((0, 10)));
        assert_eq!(parse_range("bytes=3-", 10), Ok((3, 7)));
        assert_eq!(parse_range("bytes=3-4", 10), Ok((3, 2)));
        assert_eq!(parse_range("bytes=3-99", 10), Ok((3, 7)));
        assert_eq!(parse_range("bytes=-4", 10), Ok((6, 4)));
        assert_eq!(parse_range("bytes=-40", 10), Ok((0, 10)));
        for bad in [
            "bytes=10-",
            "bytes=5-4",
            "bytes=-0",
            "items=0-",
            "bytes=0-1,3-4",
            "bytes=x-",
        ] {
            assert_eq!(parse_range(bad, 10), Err(BlobError::BadRange), "{bad}");
        }
        assert_eq!(parse_range("bytes=0-", 0), Err(BlobError::BadRange));
    }
}
