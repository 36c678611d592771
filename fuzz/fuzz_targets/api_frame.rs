//! `blixard/api/1` as a node reads it before authorization: the length-prefixed framing
//! of a stream, and the request body decoder; also the response decoder the CLI runs.
#![no_main]

use blixard_fuzz::now;
use blixard_net::api::{RequestFrame, ResponseItem};
use blixard_net::frame::{decode, encode, Reader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode::<RequestFrame>(data) {
        // Whatever decodes encodes again, to a frame that decodes to the same request.
        let bytes = encode(&frame).ok();
        assert!(bytes.is_some());
        if let Some(bytes) = bytes {
            let again = decode::<RequestFrame>(bytes.get(4..).unwrap_or_default()).ok();
            assert!(again.as_ref() == Some(&frame));
        }
        let _ = frame.request.kind();
    }
    let _ = decode::<ResponseItem>(data);
    // The same bytes as a whole stream: frames until the end or the first error.
    let mut reader = Reader::new(data);
    for _ in 0..64 {
        match now(reader.read_raw()) {
            Some(Ok(Some(body))) => {
                let _ = decode::<RequestFrame>(&body);
            }
            _ => break,
        }
    }
});
