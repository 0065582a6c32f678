//! Encoding and decoding of whole frames, with the size and version checks every peer applies
//! before it looks inside.

use prost::Message;

use crate::wire::{ClientFrame, ServerFrame};

/// The protocol version this code speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest frame either side accepts, in bytes. Big enough for a Welcome to a small group,
/// small enough that a hostile peer cannot make the other side buffer much.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Why bytes are not a frame this side will act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of {size} bytes is larger than the maximum of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("frame is not valid protobuf: {0}")]
    Malformed(#[from] prost::DecodeError),
    #[error("frame version {version} is not supported (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion { version: u32, request_id: u64 },
    #[error("frame has no body this side knows")]
    UnknownBody { request_id: u64 },
}

impl FrameError {
    /// The request id the peer used, when the frame got far enough to have one.
    pub fn request_id(&self) -> u64 {
        match self {
            FrameError::UnsupportedVersion { request_id, .. }
            | FrameError::UnknownBody { request_id } => *request_id,
            FrameError::TooLarge { .. } | FrameError::Malformed(_) => 0,
        }
    }
}

pub fn encode<M: Message>(message: &M) -> Vec<u8> {
    message.encode_to_vec()
}

fn check_size(bytes: &[u8]) -> Result<(), FrameError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            size: bytes.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    Ok(())
}

fn check_version(version: u32, request_id: u64) -> Result<(), FrameError> {
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion {
            version,
            request_id,
        });
    }
    Ok(())
}

/// Decodes a frame sent by a client. The body is guaranteed to be present.
pub fn decode_client_frame(bytes: &[u8]) -> Result<ClientFrame, FrameError> {
    check_size(bytes)?;
    let frame = ClientFrame::decode(bytes)?;
    check_version(frame.version, frame.request_id)?;
    if frame.body.is_none() {
        return Err(FrameError::UnknownBody {
            request_id: frame.request_id,
        });
    }
    Ok(frame)
}

/// Decodes a frame sent by a server. The body is guaranteed to be present.
pub fn decode_server_frame(bytes: &[u8]) -> Result<ServerFrame, FrameError> {
    check_size(bytes)?;
    let frame = ServerFrame::decode(bytes)?;
    check_version(frame.version, frame.request_id)?;
    if frame.body.is_none() {
        return Err(FrameError::UnknownBody {
            request_id: frame.request_id,
        });
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Hello, Ping, client_frame::Body};

    fn frame(version: u32, body: Option<Body>) -> Vec<u8> {
        encode(&ClientFrame {
            version,
            request_id: 42,
            body,
        })
    }

    #[test]
    fn decodes_a_valid_frame() {
        let bytes = frame(1, Some(Body::Ping(Ping {})));
        let decoded = decode_client_frame(&bytes).unwrap();
        assert_eq!(decoded.request_id, 42);
    }

    #[test]
    fn rejects_oversized_frames_before_decoding() {
        let bytes = vec![0u8; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            decode_client_frame(&bytes),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn rejects_garbage_with_a_typed_error() {
        let error = decode_client_frame(&[0xff, 0xff, 0xff]).unwrap_err();
        assert!(matches!(error, FrameError::Malformed(_)));
    }

    #[test]
    fn rejects_unknown_versions_and_keeps_the_request_id() {
        let bytes = frame(2, Some(Body::Hello(Hello { versions: vec![2] })));
        let error = decode_client_frame(&bytes).unwrap_err();
        assert_eq!(
            error,
            FrameError::UnsupportedVersion {
                version: 2,
                request_id: 42
            }
        );
        assert_eq!(error.request_id(), 42);
    }

    #[test]
    fn a_body_from_the_future_is_an_unknown_body() {
        // Field 999, varint 1: a request type this version has never heard of.
        let mut bytes = frame(1, None);
        bytes.extend_from_slice(&[0xb8, 0x3e, 0x01]);
        assert_eq!(
            decode_client_frame(&bytes),
            Err(FrameError::UnknownBody { request_id: 42 })
        );
    }
}
