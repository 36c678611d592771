//! The consensus layer: [`RaftCore`] owns the raft-rs `RawNode` and the state machine and
//! handles `Ready` in the documented order; [`RaftNode`] runs a core on its own thread and
//! gives the rest of the daemon proposals with results, linearizable reads and membership
//! changes. The network is behind the [`Transport`] trait, so the simulation drives the
//! same core over an in-memory network.
//!
//! **Boundary:** knows nothing of Iroh or the API; messages leave through [`Transport`].

mod core;
mod logger;
mod metrics;
mod node;

pub use crate::core::{
    Applied, Change, CoreConfig, CoreError, EntryTracing, Output, RaftCore, StateCopy,
};
pub use logger::tracing_logger;
pub use metrics::RaftMetrics;
pub use node::{NodeStatus, PeerStatus, ProposeError, RaftNode, Transport};
pub use raft::eraftpb::Message;
pub use raft::StateRole;

/// Encodes a raft message for the wire (protobuf, as raft-rs defines it).
pub fn encode_message(msg: &Message) -> Result<Vec<u8>, raft::Error> {
    use protobuf::Message as _;
    msg.write_to_bytes().map_err(raft::Error::CodecError)
}

/// Decodes a raft message. Only call this on bytes from an authenticated cluster member:
/// the protobuf decoder is old and not hardened against hostile input.
pub fn decode_message(bytes: &[u8]) -> Result<Message, raft::Error> {
    use protobuf::Message as _;
    Message::parse_from_bytes(bytes).map_err(raft::Error::CodecError)
}
