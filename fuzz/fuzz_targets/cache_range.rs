//! The binary cache's `Range` header, which any HTTP client sends.
#![no_main]

use blixard_images::cache::range::{wanted, Wanted};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first 8 bytes are the NAR's size, the rest the header.
    let Some((size, header)) = data.split_first_chunk::<8>() else {
        return;
    };
    let size = u64::from_le_bytes(*size) >> (size[0] % 64);
    if let Wanted::Part(r) = wanted(Some(header), size) {
        assert!(r.start < r.end && r.end <= size, "{r:?} of {size}");
    }
});
