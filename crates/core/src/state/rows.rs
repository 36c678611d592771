//! The state as rows: the changes after an `apply`, every row for a snapshot, loading
//! from stored rows, and a digest over all of them.

use super::State;
use crate::encoding::DecodeError;
use crate::table::Row;

/// Stored state could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("unknown state table {0:?} (written by a newer blixard?)")]
    UnknownTable(String),
    #[error("corrupt row in table {table:?}")]
    Row {
        table: String,
        #[source]
        source: DecodeError,
    },
}

impl State {
    /// The rows changed since the last call; the storage layer writes them with the
    /// applied index in one transaction.
    pub fn drain_changes(&mut self) -> Vec<Row> {
        let mut out = Vec::new();
        for table in self.tables_mut() {
            table.drain_changes(&mut out);
        }
        out
    }

    /// Every row: the body of a snapshot.
    pub fn all_rows(&self) -> Vec<Row> {
        let mut out = Vec::new();
        for table in self.tables() {
            table.all_rows(&mut out);
        }
        out
    }

    /// Rebuilds a state from stored rows. Unknown tables are an error: they mean the data
    /// was written by a newer Blixard.
    pub fn from_rows<'a>(
        rows: impl IntoIterator<Item = (&'a str, &'a [u8], &'a [u8])>,
    ) -> Result<Self, LoadError> {
        let mut state = State::new();
        for (table, key, value) in rows {
            let Some(target) = state.tables_mut().into_iter().find(|t| t.name() == table) else {
                return Err(LoadError::UnknownTable(table.to_string()));
            };
            target.load(key, value).map_err(|source| LoadError::Row {
                table: table.to_string(),
                source,
            })?;
        }
        Ok(state)
    }

    /// A digest of the whole state, equal on nodes that applied the same log.
    pub fn digest(&self) -> u64 {
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for row in self.all_rows() {
            for byte in row
                .table
                .bytes()
                .chain(row.key.iter().copied())
                .chain(row.value.iter().flatten().copied())
            {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_unique() {
        let state = State::new();
        let names: Vec<&str> = state.tables().iter().map(|t| t.name()).collect();
        let unique: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
    }

    #[test]
    fn tables_keep_their_order() {
        // The order of the tables is the order of rows, and so part of the digest: new
        // tables go at the end.
        let state = State::new();
        let names: Vec<&str> = state.tables().iter().map(|t| t.name()).collect();
        let first = [
            "meta",
            "members",
            "removed",
            "admins",
            "join_tokens",
            "kv",
            "users",
            "policies",
            "images",
            "cache_key",
            "tenants",
            "vms",
            "drained",
            "down",
        ];
        assert!(names.starts_with(&first), "{names:?}");
    }
}
