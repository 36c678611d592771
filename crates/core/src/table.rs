//! A state-machine table: an ordered map that remembers which keys changed.
//!
//! The state machine only touches [`Table`]s; after an `apply` the storage layer drains the
//! changed rows and writes them in the same transaction as the applied index. The state's
//! tables are listed once, in the `tables!` list in `state/mod.rs`.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::encoding::{decode_versioned, encode_versioned, DecodeError};

/// One stored row: the table name, the encoded key, and the encoded value (`None` = deleted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub table: String,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// An ordered map whose changes can be drained as [`Row`]s.
#[derive(Clone, Debug)]
pub struct Table<K: Ord, V> {
    name: &'static str,
    map: BTreeMap<K, V>,
    dirty: BTreeSet<K>,
}

impl<K, V> Table<K, V>
where
    K: Ord + Clone + Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            map: BTreeMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    pub fn contains(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    pub fn insert(&mut self, key: K, value: V) {
        self.dirty.insert(key.clone());
        self.map.insert(key, value);
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let old = self.map.remove(key);
        if old.is_some() {
            self.dirty.insert(key.clone());
        }
        old
    }

    /// Changes a value in place and marks it changed.
    pub fn update(&mut self, key: &K, f: impl FnOnce(&mut V)) -> bool {
        match self.map.get_mut(key) {
            Some(v) => {
                f(v);
                self.dirty.insert(key.clone());
                true
            }
            None => false,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter()
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.map.values()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The entry with the smallest key.
    pub fn first(&self) -> Option<(&K, &V)> {
        self.map.first_key_value()
    }

    /// The entry with the largest key.
    pub fn last(&self) -> Option<(&K, &V)> {
        self.map.last_key_value()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The rows changed since the last drain.
    pub fn drain_changes(&mut self, out: &mut Vec<Row>) {
        for key in std::mem::take(&mut self.dirty) {
            out.push(Row {
                table: self.name.to_string(),
                key: encode_versioned(&key),
                value: self.map.get(&key).map(encode_versioned),
            });
        }
    }

    /// Every row, for snapshots.
    pub fn all_rows(&self, out: &mut Vec<Row>) {
        for (k, v) in &self.map {
            out.push(Row {
                table: self.name.to_string(),
                key: encode_versioned(k),
                value: Some(encode_versioned(v)),
            });
        }
    }

    /// Loads one stored row (on start-up or from a snapshot); not marked changed.
    pub fn load(&mut self, key: &[u8], value: &[u8]) -> Result<(), DecodeError> {
        self.map
            .insert(decode_versioned(key)?, decode_versioned(value)?);
        Ok(())
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.dirty.clear();
    }
}

/// A [`Table`] with its key and value types erased: what the state needs to list its
/// tables as one array and turn them into rows and back.
pub(crate) trait AnyTable {
    fn name(&self) -> &'static str;
    fn drain_changes(&mut self, out: &mut Vec<Row>);
    fn all_rows(&self, out: &mut Vec<Row>);
    fn load(&mut self, key: &[u8], value: &[u8]) -> Result<(), DecodeError>;
}

impl<K, V> AnyTable for Table<K, V>
where
    K: Ord + Clone + Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    fn name(&self) -> &'static str {
        Table::name(self)
    }

    fn drain_changes(&mut self, out: &mut Vec<Row>) {
        Table::drain_changes(self, out)
    }

    fn all_rows(&self, out: &mut Vec<Row>) {
        Table::all_rows(self, out)
    }

    fn load(&mut self, key: &[u8], value: &[u8]) -> Result<(), DecodeError> {
        Table::load(self, key, value)
    }
}
