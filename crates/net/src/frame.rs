//! Length-prefixed frames: a big-endian u32 length, then that many bytes of postcard.

use iroh::endpoint::{RecvStream, SendStream};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("stream closed")]
    Closed,
    #[error("read failed: {0}")]
    Read(String),
    #[error("write failed: {0}")]
    Write(String),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Decodes a frame body. Shared by the stream reader, tests and the fuzz target.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let body = postcard::to_stdvec(value).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge(body.len()))?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads one frame; `Ok(None)` when the peer finished the stream cleanly before a frame.
pub async fn read_raw(recv: &mut RecvStream) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    match recv.read(&mut len[..1]).await {
        Ok(None) => return Ok(None),
        Ok(Some(_)) => {}
        Err(e) => return Err(FrameError::Read(e.to_string())),
    }
    recv.read_exact(&mut len[1..])
        .await
        .map_err(|e| FrameError::Read(e.to_string()))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| FrameError::Read(e.to_string()))?;
    Ok(Some(body))
}

pub async fn read<T: DeserializeOwned>(recv: &mut RecvStream) -> Result<T, FrameError> {
    match read_raw(recv).await? {
        Some(body) => decode(&body),
        None => Err(FrameError::Closed),
    }
}

pub async fn write<T: Serialize>(send: &mut SendStream, value: &T) -> Result<(), FrameError> {
    let bytes = encode(value)?;
    send.write_all(&bytes)
        .await
        .map_err(|e| FrameError::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RequestFrame;
    use proptest::prelude::*;

    proptest! {
        // Arbitrary bytes never panic the request decoder.
        #[test]
        fn request_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<RequestFrame>(&bytes);
        }

        // Valid requests with bytes flipped, cut or extended decode to an error or to some
        // request, never to a panic or an unbounded allocation.
        #[test]
        fn damaged_requests_never_panic(
            key in "[a-z]{1,20}",
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let frame = RequestFrame::new(None, crate::api::Request::UserAdd(crate::api::UserAdd {
                name: key,
                key: blixard_core::EndpointKey([7; 32]),
                roles: vec!["viewer".into()],
                tenant: Some("acme".into()),
            }));
            let mut bytes = encode(&frame).unwrap()[4..].to_vec();
            for (at, byte) in flips {
                let i = at % bytes.len();
                bytes[i] ^= byte;
            }
            let _ = decode::<RequestFrame>(&bytes);
            let _ = decode::<RequestFrame>(&bytes[..cut % bytes.len()]);
        }

        #[test]
        fn frames_round_trip(key in "[a-z]{1,20}", value in proptest::option::of(".{0,40}")) {
            let frame = RequestFrame::new(None, crate::api::Request::MetaSet(crate::api::MetaSet { key: key.clone(), value: value.clone() }));
            let bytes = encode(&frame).unwrap();
            let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
            prop_assert_eq!(len, bytes.len() - 4);
            let back: RequestFrame = decode(&bytes[4..]).unwrap();
            prop_assert_eq!(back, frame);
        }
    }
}
