//! The crate's error type and its conversions.

use std::path::PathBuf;

use raft::StorageError as RaftStorageError;

/// Storage failures. Each names what could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path} is in use by another process (is a blixard node already running on this data dir?)")]
    Locked { path: PathBuf },
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("database error: {0}")]
    Db(#[from] redb::Error),
    #[error("corrupt {what} in the database: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("raft storage: {0}")]
    Raft(#[from] raft::Error),
    #[error("data file {path} has format {found}, written by a newer blixard; this blixard reads formats 1 to {reads}: run the newer release (a data file is never downgraded)")]
    NewerFormat { path: PathBuf, found: u8, reads: u8 },
    #[error("cannot keep a copy of data file {path} before migrating it: {source}")]
    MigrationCopy {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub(crate) fn corrupt(what: &'static str, detail: impl ToString) -> StoreError {
    StoreError::Corrupt {
        what,
        detail: detail.to_string(),
    }
}

impl From<StoreError> for raft::Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Raft(e) => e,
            other => raft::Error::Store(RaftStorageError::Other(Box::new(other))),
        }
    }
}
