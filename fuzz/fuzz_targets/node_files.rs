//! The JSON files the daemon reads besides its config: the expected members
//! (members.json) and the declared VMs (vms.json), both written by the NixOS module.
#![no_main]

use std::path::Path;

use blixard_fuzz::text;
use blixard_node::{config, declared};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(s) = text(data) else {
        return;
    };
    let path = Path::new("/etc/blixard/fuzz.json");
    if let Ok(members) = config::parse_members(s, path) {
        for m in &members {
            assert_eq!(m.socket_addrs().len(), m.addresses.len());
        }
    }
    let _ = declared::parse(s, path);
});
