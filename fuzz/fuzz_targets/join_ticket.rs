//! Join tickets (`node run --join`) and the identifiers a user types (node ids, keys,
//! cluster ids).
#![no_main]

use blixard_core::{ClusterId, EndpointKey, NodeId};
use blixard_fuzz::text;
use blixard_net::ticket::JoinTicket;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(s) = text(data) else {
        return;
    };
    if let Ok(ticket) = s.parse::<JoinTicket>() {
        // What parses prints as a ticket that parses to the same.
        assert_eq!(ticket.to_string().parse::<JoinTicket>(), Ok(ticket));
    }
    // A parsed id prints as the canonical form of what was typed.
    let t = s.trim();
    if let Ok(k) = t.parse::<EndpointKey>() {
        assert_eq!(k.to_string(), t.to_ascii_lowercase());
    }
    if let Ok(c) = t.parse::<ClusterId>() {
        assert_eq!(c.to_string(), t.to_ascii_lowercase());
    }
    if let Ok(n) = t.parse::<NodeId>() {
        assert_eq!(n.to_string().parse::<NodeId>(), Ok(n));
    }
});
