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

mod persist;
mod storage;

pub use storage::{NodeRecord, PersistNotify, Store, StoreError, WriteBatch};
