//! An image's manifest, the first blob of its hash sequence, as a node reads it from a
//! peer before it fetches the NARs the manifest names.
#![no_main]

use blixard_images::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The hash sequence a peer would send with it: none, or exactly the manifest's blobs.
    let _ = Manifest::parse(data, &[]);
    let Ok(m) = serde_json::from_slice::<Manifest>(data) else {
        return;
    };
    let Ok(checked) = m.check() else {
        return;
    };
    let children: Vec<iroh_blobs::Hash> = checked.iter().map(|e| e.blob).collect();
    if let Ok(parsed) = Manifest::parse(data, &children) {
        let _ = parsed.store_dir();
        let _ = parsed.total_size();
        if let Ok(bytes) = parsed.to_bytes() {
            assert_eq!(Manifest::parse(&bytes, &children).ok(), Some(parsed));
        }
    }
});
