//! Backup files (`cluster backup verify`, `node restore`): the whole file (magic, version,
//! checksum), and, since a fuzzer cannot forge a BLAKE3 checksum, the body the checksum
//! covers, decoded as if it had matched.
#![no_main]

use blixard_core::backup;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = backup::decode(data);
    if let Ok(b) = backup::decode_body(data) {
        // What loads writes again to a file that loads to the same state.
        let again = backup::encode(&b.header, b.state.all_rows()).expect("it fitted before");
        let back = backup::decode(&again).expect("a file just written decodes");
        assert_eq!(back.header, b.header);
        assert_eq!(back.state.digest(), b.state.digest());
    }
});
