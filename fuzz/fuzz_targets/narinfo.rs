//! Nix's text and JSON formats: narinfo files, `nix path-info --json` output, binary
//! cache keys and signatures.
#![no_main]

use blixard_fuzz::text;
use blixard_images::nix::{parse_path_info_json, NarInfo, PublicKey, SigningKey, StoreDir};
use libfuzzer_sys::fuzz_target;

const PUB: &str = "blixard-test-1:GrgcD3TWPz/gmg8NpC5s7qwhkntbMATZfbfTElg4ZeU=";

fuzz_target!(|data: &[u8]| {
    let Some(s) = text(data) else {
        return;
    };
    let dir = StoreDir::default();
    if let Ok(info) = NarInfo::parse(s, &dir) {
        // What parses renders to a narinfo that parses and renders the same (rendering
        // sorts and deduplicates the references).
        let text = info.render(&dir);
        let again = NarInfo::parse(&text, &dir).map(|i| i.render(&dir));
        assert_eq!(again.ok(), Some(text));
        if let Ok(key) = PublicKey::parse(PUB) {
            let _ = info.has_valid_signature(&dir, &[key]);
        }
    }
    let _ = parse_path_info_json(s, &dir);
    if let Ok(k) = PublicKey::parse(s) {
        assert_eq!(PublicKey::parse(&k.to_nix_string()).ok(), Some(k));
    }
    let _ = SigningKey::from_nix_secret(s);
});
