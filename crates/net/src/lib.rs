//! Blixard's network layer: one Iroh endpoint per node, two versioned ALPNs, and the one
//! choke point every API request passes.
//!
//! * `blixard/raft/1` ([`RAFT_ALPN`]): raft messages between members, batched per peer over
//!   one long-lived stream, snapshots in chunks.
//! * `blixard/api/1` ([`API_ALPN`]): typed request/response, one bi-stream per request,
//!   postcard in length-prefixed frames of at most [`frame::MAX_FRAME`] bytes.
//!
//! **Invariant:** every API request is authorized by [`authz::authorize`] with the
//! caller's authenticated endpoint id before any handler sees it.
//! **Boundary:** only this crate speaks the wire formats.

pub mod api;
pub mod authz;
pub mod client;
pub mod endpoint;
pub mod frame;
pub mod keys;
pub mod metrics;
pub mod raft_transport;
pub mod server;
pub mod ticket;
pub mod trace;

/// Raft messages between members.
pub const RAFT_ALPN: &[u8] = b"blixard/raft/1";
/// The typed API.
pub const API_ALPN: &[u8] = b"blixard/api/1";

pub use iroh::{EndpointAddr, EndpointId, SecretKey};

/// Converts an Iroh endpoint id to the state machine's key type.
pub fn key_of(id: &EndpointId) -> blixard_core::EndpointKey {
    blixard_core::EndpointKey(*id.as_bytes())
}

/// Converts a stored key back to an Iroh endpoint id.
pub fn endpoint_id(key: &blixard_core::EndpointKey) -> Option<EndpointId> {
    EndpointId::from_bytes(&key.0).ok()
}

/// The address of a member as Iroh dials it.
pub fn member_addr(
    key: &blixard_core::EndpointKey,
    addrs: &[std::net::SocketAddr],
) -> Option<EndpointAddr> {
    let id = endpoint_id(key)?;
    Some(
        addrs
            .iter()
            .fold(EndpointAddr::new(id), |a, s| a.with_ip_addr(*s)),
    )
}
