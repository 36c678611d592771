//! `blixard node run --config`: the TOML file, and its JSON form (what the NixOS module
//! produces).
#![no_main]

use blixard_fuzz::text;
use blixard_node::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(s) = text(data) else {
        return;
    };
    if let Ok(c) = Config::parse(s) {
        let _ = c.images.cache_limits();
        let _ = c.shutdown_timeout();
    }
    if let Ok(c) = Config::parse_json(s) {
        // A valid config survives its JSON form (`node check-config` prints it).
        if let Ok(json) = serde_json::to_string(&c) {
            assert_eq!(Config::parse_json(&json).ok(), Some(c));
        }
    }
});
