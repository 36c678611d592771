//! Fuzzes what a node reads from an API stream before authorization: the frame body
//! decoder for requests, and (for completeness) for responses the CLI reads.
//! Run with `cargo +nightly fuzz run api_frame` from this directory.
#![no_main]

use blixard_net::api::{RequestFrame, ResponseItem};
use blixard_net::frame::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode::<RequestFrame>(data) {
        // Whatever decodes must encode again: no frame the server accepts is lost.
        let bytes = blixard_net::frame::encode(&frame).ok();
        assert!(bytes.is_some());
        let _ = frame.request.kind();
    }
    let _ = decode::<ResponseItem>(data);
});
