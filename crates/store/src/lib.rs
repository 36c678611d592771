//! redb storage for Blixard: one database file holds the raft log, the hard state, the
//! configuration, the compaction point, the applied index and the state-machine tables.
//!
//! **Invariant:** the applied index is written in the same transaction as the state rows it
//! produced, so a crash never leaves state and applied index disagreeing.
//! **Invariant:** opening never initialises over existing data: a file that cannot be read
//! is an error, never an empty store.
//! **Invariant:** queued writes ([`Store::submit`]) reach the file in the order they were
//! queued; until then their entries are served from memory, never lost from view.
//! **Boundary:** only this crate touches redb.
//!
//! Modules, each using only those listed before it: `error` ([`StoreError`]), `batch`
//! ([`WriteBatch`]), `tables` (the redb tables and value encodings), `persist` (the
//! in-memory tail and the write queue), `storage` ([`Store`]: writes, raft-rs `Storage`,
//! the writer thread).

mod batch;
mod error;
mod persist;
mod storage;
mod tables;

pub use batch::WriteBatch;
pub use error::StoreError;
pub use persist::{PersistNotify, Persisted};
pub use storage::{CheckReport, NodeRecord, Store};
/// The stored value format (a checksum of place and bytes, then the bytes), for tools and
/// tests that read or write a data file directly.
pub use tables::{seal, unseal, Slot, DATA_FORMAT};
