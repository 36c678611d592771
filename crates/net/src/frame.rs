//! Length-prefixed frames: a big-endian u32 length, then that many bytes of postcard.
//!
//! The length prefix is tokio-util's [`LengthDelimitedCodec`], configured for a 4-byte
//! big-endian length and `max_frame_length(MAX_FRAME)`; this module adds postcard and maps
//! the codec's errors to [`FrameError`]. Reading and writing use it differently, on purpose:
//!
//! * **Reads** go through a [`Reader`], a [`FramedRead`] over the stream. The codec reads
//!   ahead into its buffer, so a stream that carries several frames (progress updates, raft
//!   batches) must be read by one `Reader` for its whole life. The free [`read`] and
//!   [`read_raw`] (kept for callers outside this crate, e.g. the process tests) drop theirs
//!   after one frame, so they are for a stream's only (or last) frame.
//! * **Writes** encode with the same codec into a `BytesMut` ([`encode`]) and `write_all`
//!   it on the caller's [`SendStream`]. A `FramedWrite` would own the stream and buffer
//!   frames until a flush, while every writer here needs the stream itself after its frames
//!   (`finish()`, then waiting for `stopped()`) and wants each frame sent when written.
//!
//! The codec refuses a length over the limit before allocating or consuming anything, so
//! [`FrameError::TooLarge`] still names the length the peer claimed.

use std::io;

use futures_util::StreamExt as _;
use iroh::endpoint::{RecvStream, SendStream};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::AsyncRead;
use tokio_util::bytes::BytesMut;
use tokio_util::codec::{
    Decoder, Encoder, FramedRead, LengthDelimitedCodec, LengthDelimitedCodecError,
};

/// The largest frame either side accepts, but for the one answer allowed more
/// ([`MAX_BACKUP_FRAME`]).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// The largest answer to a `ClusterBackup`: the whole state in one frame. Only a caller
/// that asked for a backup reads a frame this large.
pub const MAX_BACKUP_FRAME: usize = blixard_core::backup::MAX_BACKUP + 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {1}-byte limit")]
    TooLarge(usize, usize),
    #[error("stream closed")]
    Closed,
    #[error("read failed: {0}")]
    Read(String),
    #[error("write failed: {0}")]
    Write(String),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// A failure of the stream under a [`Reader`] (what [`FramedRead`] needs of its codec's
/// error type).
impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        FrameError::Read(e.to_string())
    }
}

/// The wire format's length prefix, refusing frames over `limit`.
fn length_codec(limit: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(limit)
        .new_codec()
}

/// Decodes a frame body. Shared by the stream reader, tests and the fuzz target.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// One whole frame: the length prefix and the postcard body.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    encode_limited(value, MAX_FRAME)
}

/// [`encode`], allowing a body of up to `limit` bytes.
pub fn encode_limited<T: Serialize>(value: &T, limit: usize) -> Result<Vec<u8>, FrameError> {
    let body = postcard::to_stdvec(value).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let mut out = BytesMut::with_capacity(4 + body.len());
    // The codec's only refusal is a body over `max_frame_length`.
    Encoder::<&[u8]>::encode(&mut length_codec(limit), &body, &mut out)
        .map_err(|_| FrameError::TooLarge(body.len(), limit))?;
    Ok(Vec::from(out))
}

/// [`LengthDelimitedCodec`] with [`FrameError`]s, and an end of stream inside a frame
/// reported as such.
#[derive(Debug)]
struct FrameCodec {
    length: LengthDelimitedCodec,
    limit: usize,
    /// Bytes of a frame not yet returned have been seen (the codec may have consumed its
    /// length prefix, so an empty buffer does not mean a clean end).
    partial: bool,
}

impl FrameCodec {
    fn new(limit: usize) -> Self {
        Self {
            length: length_codec(limit),
            limit,
            partial: false,
        }
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        self.partial |= !src.is_empty();
        match self.length.decode(src) {
            Ok(Some(body)) => {
                self.partial = false;
                Ok(Some(body))
            }
            Ok(None) => Ok(None),
            Err(e)
                if e.get_ref()
                    .is_some_and(|e| e.is::<LengthDelimitedCodecError>()) =>
            {
                // Refused before the prefix was consumed: it is still at the front.
                let claimed = src
                    .first_chunk::<4>()
                    .map_or(self.limit + 1, |b| u32::from_be_bytes(*b) as usize);
                Err(FrameError::TooLarge(claimed, self.limit))
            }
            Err(e) => Err(FrameError::Malformed(e.to_string())),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        match self.decode(src)? {
            Some(body) => Ok(Some(body)),
            None if self.partial => Err(FrameError::Read(
                "stream finished early, inside a frame".into(),
            )),
            None => Ok(None),
        }
    }
}

/// Reads the frames of one stream. Keep one for the stream's life: it reads ahead, so its
/// buffer may already hold the next frames.
#[derive(Debug)]
pub struct Reader<R = RecvStream> {
    frames: FramedRead<R, FrameCodec>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(recv: R) -> Self {
        Self::with_limit(recv, MAX_FRAME)
    }

    /// A reader that accepts frames of up to `limit` bytes.
    pub fn with_limit(recv: R, limit: usize) -> Self {
        Self {
            frames: FramedRead::new(recv, FrameCodec::new(limit)),
        }
    }

    /// Reads one frame's body; `Ok(None)` when the peer finished the stream cleanly before
    /// a frame.
    pub async fn read_raw(&mut self) -> Result<Option<BytesMut>, FrameError> {
        self.frames.next().await.transpose()
    }

    /// Reads and decodes one frame; [`FrameError::Closed`] if the stream ended before it.
    pub async fn read<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        match self.read_raw().await? {
            Some(body) => decode(&body),
            None => Err(FrameError::Closed),
        }
    }
}

/// Reads a stream's only (or last) frame; `Ok(None)` when the peer finished the stream
/// cleanly before a frame. Bytes after the frame are lost: read a stream of several frames
/// with one [`Reader`].
pub async fn read_raw(recv: &mut RecvStream) -> Result<Option<Vec<u8>>, FrameError> {
    Ok(Reader::new(recv).read_raw().await?.map(Vec::from))
}

/// Reads and decodes a stream's only (or last) frame; see [`read_raw`].
pub async fn read<T: DeserializeOwned>(recv: &mut RecvStream) -> Result<T, FrameError> {
    Reader::new(recv).read().await
}

pub async fn write<T: Serialize>(send: &mut SendStream, value: &T) -> Result<(), FrameError> {
    write_limited(send, value, MAX_FRAME).await
}

/// [`write`], allowing a body of up to `limit` bytes.
pub async fn write_limited<T: Serialize>(
    send: &mut SendStream,
    value: &T,
    limit: usize,
) -> Result<(), FrameError> {
    let bytes = encode_limited(value, limit)?;
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
            prop_assert_eq!(&back, &frame);
            // Byte for byte the format written before the codec: u32 BE length, postcard.
            let body = postcard::to_stdvec(&frame).unwrap();
            let mut expected = (body.len() as u32).to_be_bytes().to_vec();
            expected.extend_from_slice(&body);
            prop_assert_eq!(bytes, expected);
        }

        // Frames split anywhere by the transport come out whole and in order.
        #[test]
        fn reader_reassembles_frames(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..6),
            chunk in 1usize..64,
        ) {
            let mut wire = Vec::new();
            for b in &bodies {
                wire.extend(encode(b).unwrap());
            }
            let mut mock = Chunked { rest: wire, chunk };
            let got = tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
                let mut reader = Reader::new(&mut mock);
                let mut got = Vec::new();
                while let Some(body) = reader.read_raw().await.unwrap() {
                    got.push(decode::<Vec<u8>>(&body).unwrap());
                }
                got
            });
            prop_assert_eq!(got, bodies);
        }
    }

    /// A stream that hands out its bytes `chunk` at a time.
    struct Chunked {
        rest: Vec<u8>,
        chunk: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let n = self.chunk.min(self.rest.len()).min(buf.remaining());
            let head: Vec<u8> = self.rest.drain(..n).collect();
            buf.put_slice(&head);
            std::task::Poll::Ready(Ok(()))
        }
    }

    async fn read_all(wire: &[u8]) -> Result<Option<BytesMut>, FrameError> {
        Reader::new(wire).read_raw().await
    }

    fn frame_of(len: usize) -> Vec<u8> {
        let mut wire = u32::try_from(len).unwrap().to_be_bytes().to_vec();
        wire.resize(4 + len, 0xab);
        wire
    }

    #[tokio::test]
    async fn a_frame_at_the_limit_is_read_and_one_byte_more_is_refused() {
        let body = read_all(&frame_of(MAX_FRAME)).await.unwrap().unwrap();
        assert_eq!(body.len(), MAX_FRAME);

        // Refused from the prefix alone: the body need not arrive.
        let over = (MAX_FRAME as u32 + 1).to_be_bytes();
        match read_all(&over).await {
            Err(e @ FrameError::TooLarge(n, _)) => {
                assert_eq!(n, MAX_FRAME + 1);
                assert_eq!(
                    e.to_string(),
                    "frame of 16777217 bytes exceeds the 16777216-byte limit"
                );
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(matches!(
            read_all(&u32::MAX.to_be_bytes()).await,
            Err(FrameError::TooLarge(n, MAX_FRAME)) if n == u32::MAX as usize
        ));
    }

    #[test]
    fn a_body_at_the_limit_is_encoded_and_one_byte_more_is_refused() {
        // postcard writes a Vec<u8> of this size as a 4-byte varint length and its bytes.
        let at = vec![0u8; MAX_FRAME - 4];
        let bytes = encode(&at).unwrap();
        assert_eq!(bytes.len(), 4 + MAX_FRAME);
        assert_eq!(bytes[..4], (MAX_FRAME as u32).to_be_bytes());
        let over = vec![0u8; MAX_FRAME - 3];
        assert!(
            matches!(encode(&over), Err(FrameError::TooLarge(n, MAX_FRAME)) if n == MAX_FRAME + 1)
        );
    }

    /// A request frame as nodes wrote it before the trace context was added.
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct FrameBeforeTrace {
        version: u16,
        cluster: Option<blixard_core::ClusterId>,
        forwarded: bool,
        id: Option<blixard_core::RequestId>,
        request: crate::api::Request,
    }

    #[test]
    fn the_trace_context_is_optional_on_the_wire_both_ways() {
        let request = crate::api::Request::MetaSet(crate::api::MetaSet {
            key: "k".into(),
            value: Some("v".into()),
        });
        let old = FrameBeforeTrace {
            version: crate::api::API_VERSION,
            cluster: None,
            forwarded: true,
            id: None,
            request: request.clone(),
        };
        // An older caller's frame reads with no trace context.
        let body = postcard::to_stdvec(&old).unwrap();
        let new: RequestFrame = decode(&body).unwrap();
        assert_eq!(new.trace, None);
        assert_eq!(new.request, request);
        assert!(new.forwarded);
        // A newer caller's frame reads on an older node, the context ignored.
        let traced = RequestFrame {
            trace: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            ..new.clone()
        };
        let body = postcard::to_stdvec(&traced).unwrap();
        assert_eq!(decode::<FrameBeforeTrace>(&body).unwrap(), old);
        assert_eq!(decode::<RequestFrame>(&body).unwrap(), traced);
        // A damaged or oversized context is dropped; the request still stands.
        let mut cut = body.clone();
        cut.truncate(body.len() - 10);
        assert_eq!(decode::<RequestFrame>(&cut).unwrap().trace, None);
        let huge = RequestFrame {
            trace: Some("0".repeat(crate::trace::MAX_TRACEPARENT + 1)),
            ..new
        };
        let body = postcard::to_stdvec(&huge).unwrap();
        let back: RequestFrame = decode(&body).unwrap();
        assert_eq!((back.trace, back.request), (None, request));
    }

    #[test]
    fn a_request_kind_from_a_newer_release_is_refused_by_name() {
        use crate::api::{undecodable_frame, ApiError, Request, API_VERSION};
        #[derive(serde::Serialize)]
        struct Newer {
            version: u16,
            cluster: Option<blixard_core::ClusterId>,
            forwarded: bool,
            id: Option<blixard_core::RequestId>,
            kind: u32,
            payload: String,
        }
        let frame = |version, kind| {
            postcard::to_stdvec(&Newer {
                version,
                cluster: None,
                forwarded: false,
                id: None,
                kind,
                payload: "what a newer kind carries".into(),
            })
            .unwrap()
        };
        let body = frame(API_VERSION, Request::KINDS);
        assert!(decode::<RequestFrame>(&body).is_err());
        match undecodable_frame(&body) {
            Some(ApiError::BadRequest(why)) => assert!(
                why.contains(&format!("does not know request kind {}", Request::KINDS))
                    && why.contains("upgrade this node"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            undecodable_frame(&frame(API_VERSION + 1, 0)),
            Some(ApiError::Version(API_VERSION + 1))
        );
        // A known kind that is malformed is not blamed on a newer caller.
        assert_eq!(undecodable_frame(&frame(API_VERSION, 0)), None);
        assert_eq!(undecodable_frame(&[0xff]), None);
    }

    #[tokio::test]
    async fn a_clean_end_is_none_and_an_end_inside_a_frame_is_an_error() {
        assert!(read_all(&[]).await.unwrap().is_none());
        assert!(matches!(
            Reader::new(&[][..]).read::<u8>().await,
            Err(FrameError::Closed)
        ));
        // Inside the prefix, right after it, and inside the body.
        for wire in [&[0, 0][..], &[0, 0, 1, 0], &[0, 0, 1, 0, 1, 2]] {
            assert!(
                matches!(read_all(wire).await, Err(FrameError::Read(_))),
                "{wire:?}"
            );
        }
        // An empty frame is a frame, not an end.
        assert_eq!(read_all(&[0, 0, 0, 0]).await.unwrap().unwrap().len(), 0);
    }
}
