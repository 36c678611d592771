//! The redb-backed store: opening, the node record, the state rows, and the raft loop's
//! writes (batches, snapshots, compaction). raft-rs's `Storage` is in `raft_storage`, the
//! queue and its writer thread in `writer`.

mod check;
mod raft_storage;
mod writer;

pub use check::CheckReport;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;

use blixard_core::{decode_versioned, encode_versioned, ClusterId, NodeId, Row, State};
use raft::eraftpb::{ConfState, HardState, Snapshot};
use raft::StorageError as RaftStorageError;
use redb::{Database, Durability, ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

use crate::batch::WriteBatch;
use crate::error::{corrupt, StoreError};
use crate::persist::{Queue, Tail};
use crate::tables::{
    decode_pair, encode_pair, meta, pb_decode, pb_encode, put_meta, seal, unseal, Slot, APPLIED,
    CONF_STATE, DATA_FORMAT, FORMAT, FORMAT_CHECKSUMMED, HARD_STATE, LOG, LOG_START, NODE, RAFT,
    STATE,
};

/// Who this node is, recorded when it initialises or joins a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub cluster_id: ClusterId,
    pub node_id: NodeId,
    /// Set when the node learns it was removed; such a data dir never starts again.
    pub removed: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct Bounds {
    /// The compaction point: entries at or below it are gone.
    start_index: u64,
    start_term: u64,
    last_index: u64,
}

struct Inner {
    db: Database,
    durability: Durability,
    bounds: RwLock<Bounds>,
    /// The newest entries, including every one not yet written. Its lock also orders log
    /// reads against compaction.
    tail: Mutex<Tail>,
    queue: Queue,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// The redb-backed raft storage and state tables. Cheap to clone; clones share the file.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Makes every earlier commit durable (a synced empty commit), e.g. before shutdown.
    pub fn sync(&self) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        txn.commit()?;
        Ok(())
    }

    /// Opens (or creates) the database at `path` with durable commits.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, Durability::Immediate)
    }

    /// Opens with commits that are not fsynced: for simulations on throwaway files.
    pub fn open_volatile(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, Durability::None)
    }

    fn open_with(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        let mut db = create_db(path)?;
        if let Some(from) = older_format(&db, path)? {
            // Migrated in one transaction below; the file as it was is kept beside it
            // first, so a migration that goes wrong loses nothing.
            drop(db);
            let copy = keep_copy(path, from)?;
            tracing::warn!(
                "data file {} has format {from}, older than this build's {DATA_FORMAT}: migrating it in place (the file as it was is kept at {})",
                path.display(),
                copy.display()
            );
            db = create_db(path)?;
        }
        {
            let mut txn = db.begin_write()?;
            txn.set_durability(durability)
                .map_err(|e| corrupt("durability", e))?;
            txn.open_table(LOG)?;
            txn.open_table(RAFT)?;
            txn.open_table(STATE)?;
            upgrade(&txn)?;
            txn.commit()?;
        }
        let store = Store {
            inner: Arc::new(Inner {
                db,
                durability,
                bounds: RwLock::new(Bounds::default()),
                tail: Mutex::new(Tail::default()),
                queue: Queue::default(),
                writer: Mutex::new(None),
            }),
        };
        let bounds = store.read_bounds()?;
        store.set_bounds(bounds);
        Ok(store)
    }

    fn read_bounds(&self) -> Result<Bounds, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let raft = txn.open_table(RAFT)?;
        let (start_index, start_term) = match meta(&raft, LOG_START)? {
            Some(v) => decode_pair("log start", &v)?,
            None => (0, 0),
        };
        let log = txn.open_table(LOG)?;
        let last_index = match log.last()? {
            Some((k, _)) => k.value().max(start_index),
            None => start_index,
        };
        Ok(Bounds {
            start_index,
            start_term,
            last_index,
        })
    }

    fn bounds(&self) -> Bounds {
        match self.inner.bounds.read() {
            Ok(b) => *b,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    fn set_bounds(&self, b: Bounds) {
        match self.inner.bounds.write() {
            Ok(mut g) => *g = b,
            Err(poisoned) => *poisoned.into_inner() = b,
        }
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        let mut txn = self.inner.db.begin_write()?;
        txn.set_durability(self.inner.durability)
            .map_err(|e| corrupt("durability", e))?;
        Ok(txn)
    }

    // ---- node identity ----

    pub fn node_record(&self) -> Result<Option<NodeRecord>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let raft = txn.open_table(RAFT)?;
        match meta(&raft, NODE)? {
            Some(v) => Ok(Some(
                decode_versioned(&v).map_err(|e| corrupt("node record", e))?,
            )),
            None => Ok(None),
        }
    }

    pub fn set_node_record(&self, record: &NodeRecord) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        {
            let mut raft = txn.open_table(RAFT)?;
            put_meta(&mut raft, NODE, &encode_versioned(record))?;
        }
        txn.commit()?;
        Ok(())
    }

    // ---- state ----

    /// Loads the state machine as of the applied index.
    pub fn load_state(&self) -> Result<(State, u64, u64), StoreError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(STATE)?;
        let mut rows: Vec<(String, Vec<u8>, Vec<u8>)> = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            let (t, key) = k.value();
            let value = unseal(Slot::Row(t, key), v.value())?;
            rows.push((t.to_string(), key.to_vec(), value.to_vec()));
        }
        let state = State::from_rows(
            rows.iter()
                .map(|(t, k, v)| (t.as_str(), k.as_slice(), v.as_slice())),
        )
        .map_err(|e| corrupt("state", e))?;
        let raft = txn.open_table(RAFT)?;
        let (applied, applied_term) = match meta(&raft, APPLIED)? {
            Some(v) => decode_pair("applied index", &v)?,
            None => (0, 0),
        };
        Ok((state, applied, applied_term))
    }

    /// Writes the first snapshot of a new cluster: `state` at index 1, term 1, with the
    /// given voters. Refuses a store that already holds a log or state.
    pub fn bootstrap(&self, state: &State, voters: &[u64]) -> Result<(), StoreError> {
        let (existing, applied, _) = self.load_state()?;
        if applied != 0 || existing.cluster().is_some() || self.bounds().last_index != 0 {
            return Err(corrupt(
                "bootstrap",
                "the data dir already holds a cluster; refusing to initialise over it",
            ));
        }
        let mut snap = Snapshot::default();
        let meta = snap.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.mut_conf_state().voters = voters.to_vec();
        snap.data = encode_versioned(&state.all_rows()).into();
        self.apply_snapshot(&snap)
    }

    /// `node run --force-new-cluster`, on a stopped store: the state as of the commit
    /// index (entries committed but not applied yet are applied; entries past the commit
    /// index are discarded, as etcd does), for the caller to change.
    pub fn committed_state(&self) -> Result<(State, u64), StoreError> {
        let (mut state, applied, _) = self.load_state()?;
        let commit = self.hard_state()?.commit.min(self.bounds().last_index);
        if commit > applied {
            for entry in self.read_entries(applied + 1, commit + 1, None)? {
                let data = match entry.get_entry_type() {
                    raft::eraftpb::EntryType::EntryNormal => entry.data.to_vec(),
                    raft::eraftpb::EntryType::EntryConfChangeV2 => {
                        let cc: raft::eraftpb::ConfChangeV2 =
                            pb_decode("conf change", &entry.data)?;
                        cc.context.to_vec()
                    }
                    raft::eraftpb::EntryType::EntryConfChange => continue,
                };
                if data.is_empty() {
                    continue;
                }
                // As the raft thread does: an entry that does not decode is skipped on
                // every node alike.
                if let Ok(env) = decode_versioned::<blixard_core::Envelope>(&data) {
                    let _ = state.apply_entry(&env.command);
                }
            }
        }
        Ok((state, commit.max(applied)))
    }

    /// Replaces the log, configuration and state with `state` as a snapshot past the end of
    /// the log, in the next term, with `voters` only (`--force-new-cluster`). Returns the
    /// snapshot's index and term.
    pub fn restart_as(&self, state: &State, voters: &[u64]) -> Result<(u64, u64), StoreError> {
        let hs = self.hard_state()?;
        let index = self
            .bounds()
            .last_index
            .max(hs.commit)
            .max(self.applied()?.0)
            + 1;
        let term = hs.term + 1;
        let mut snap = Snapshot::default();
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.mut_conf_state().voters = voters.to_vec();
        snap.data = encode_versioned(&state.all_rows()).into();
        self.apply_snapshot(&snap)?;
        self.sync()?;
        Ok((index, term))
    }

    // ---- the raft loop's writes ----

    /// Writes a batch in one transaction: appended entries (replacing any conflicting
    /// tail), the hard state, state rows, the applied index and the configuration.
    pub fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut bounds = self.bounds();
        let mut txn = self.begin_write()?;
        if !batch.sync {
            // Lost on a crash together with everything after it, never torn: redb commits
            // are atomic and ordered. Made durable by the next synced commit.
            txn.set_durability(Durability::None)
                .map_err(|e| corrupt("durability", e))?;
        }
        {
            let mut log = txn.open_table(LOG)?;
            if let Some(first) = batch.entries.first() {
                if first.index <= bounds.start_index {
                    return Err(StoreError::Raft(raft::Error::Store(
                        RaftStorageError::Compacted,
                    )));
                }
                if first.index > bounds.last_index + 1 {
                    return Err(corrupt(
                        "append",
                        format!(
                            "gap in the log: last index {}, appending {}",
                            bounds.last_index, first.index
                        ),
                    ));
                }
                // Drop the conflicting tail.
                if first.index <= bounds.last_index {
                    log.retain_in(first.index.., |_, _| false)?;
                }
                for e in &batch.entries {
                    log.insert(e.index, seal(Slot::Log(e.index), &pb_encode(e)?).as_slice())?;
                }
                if let Some(last) = batch.entries.last() {
                    bounds.last_index = last.index;
                }
            }
            let mut raft = txn.open_table(RAFT)?;
            if let Some(hs) = &batch.hard_state {
                put_meta(&mut raft, HARD_STATE, &pb_encode(hs)?)?;
            }
            if let Some(cs) = &batch.conf_state {
                put_meta(&mut raft, CONF_STATE, &pb_encode(cs)?)?;
            }
            if let Some((index, term)) = batch.applied {
                put_meta(&mut raft, APPLIED, &encode_pair(index, term))?;
            }
            let mut state = txn.open_table(STATE)?;
            for row in &batch.rows {
                match &row.value {
                    Some(v) => {
                        let sealed = seal(Slot::Row(&row.table, &row.key), v);
                        state
                            .insert((row.table.as_str(), row.key.as_slice()), sealed.as_slice())?;
                    }
                    None => {
                        state.remove((row.table.as_str(), row.key.as_slice()))?;
                    }
                }
            }
        }
        txn.commit()?;
        self.set_bounds(bounds);
        if let Some(last) = batch.entries.last() {
            self.tail().written(last.index, last.term);
        }
        Ok(())
    }

    /// Replaces log, configuration and state with a snapshot received from the leader.
    pub fn apply_snapshot(&self, snap: &Snapshot) -> Result<(), StoreError> {
        let meta = snap.get_metadata();
        let rows: Vec<Row> =
            decode_versioned(&snap.data).map_err(|e| corrupt("snapshot data", e))?;
        // Validate before touching anything.
        State::from_rows(rows.iter().map(|r| {
            (
                r.table.as_str(),
                r.key.as_slice(),
                r.value.as_deref().unwrap_or_default(),
            )
        }))
        .map_err(|e| corrupt("snapshot data", e))?;
        if meta.index <= self.bounds().start_index {
            return Err(StoreError::Raft(raft::Error::Store(
                RaftStorageError::SnapshotOutOfDate,
            )));
        }
        let mut hs = self.hard_state()?;
        if meta.term > hs.term {
            // A vote belongs to its term.
            hs.vote = 0;
        }
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        let mut tail = self.tail();
        let txn = self.begin_write()?;
        {
            let mut log = txn.open_table(LOG)?;
            log.retain(|_, _| false)?;
            let mut state = txn.open_table(STATE)?;
            state.retain(|_, _| false)?;
            for row in &rows {
                if let Some(v) = &row.value {
                    let sealed = seal(Slot::Row(&row.table, &row.key), v);
                    state.insert((row.table.as_str(), row.key.as_slice()), sealed.as_slice())?;
                }
            }
            let mut raft = txn.open_table(RAFT)?;
            put_meta(&mut raft, HARD_STATE, &pb_encode(&hs)?)?;
            put_meta(&mut raft, CONF_STATE, &pb_encode(meta.get_conf_state())?)?;
            put_meta(&mut raft, LOG_START, &encode_pair(meta.index, meta.term))?;
            put_meta(&mut raft, APPLIED, &encode_pair(meta.index, meta.term))?;
        }
        txn.commit()?;
        self.set_bounds(Bounds {
            start_index: meta.index,
            start_term: meta.term,
            last_index: meta.index,
        });
        tail.clear();
        Ok(())
    }

    /// Discards log entries up to and including `index`, which must be applied.
    pub fn compact(&self, index: u64) -> Result<(), StoreError> {
        let bounds = self.bounds();
        if index <= bounds.start_index {
            return Ok(());
        }
        let (applied, _) = self.applied()?;
        if index > applied || index > bounds.last_index {
            return Err(corrupt(
                "compaction",
                format!(
                    "cannot compact to {index}: applied {applied}, last {}",
                    bounds.last_index
                ),
            ));
        }
        let term = raft::Storage::term(self, index)?;
        // Readers check the bounds and read under the tail's lock: none sees the entries
        // gone before the bounds say so.
        let mut tail = self.tail();
        let txn = self.begin_write()?;
        {
            let mut log = txn.open_table(LOG)?;
            log.retain_in(..=index, |_, _| false)?;
            let mut raft = txn.open_table(RAFT)?;
            put_meta(&mut raft, LOG_START, &encode_pair(index, term))?;
        }
        txn.commit()?;
        self.set_bounds(Bounds {
            start_index: index,
            start_term: term,
            last_index: bounds.last_index,
        });
        tail.compacted(index);
        Ok(())
    }

    /// The applied index and its term.
    pub fn applied(&self) -> Result<(u64, u64), StoreError> {
        let txn = self.inner.db.begin_read()?;
        let raft = txn.open_table(RAFT)?;
        let (i, t) = match meta(&raft, APPLIED)? {
            Some(v) => decode_pair("applied index", &v)?,
            None => (0, 0),
        };
        Ok((i, t))
    }

    pub fn hard_state(&self) -> Result<HardState, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let raft = txn.open_table(RAFT)?;
        match meta(&raft, HARD_STATE)? {
            Some(v) => pb_decode("hard state", &v),
            None => Ok(HardState::default()),
        }
    }

    pub fn conf_state(&self) -> Result<ConfState, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let raft = txn.open_table(RAFT)?;
        match meta(&raft, CONF_STATE)? {
            Some(v) => pb_decode("conf state", &v),
            None => Ok(ConfState::default()),
        }
    }

    /// The number of entries in the log (for compaction decisions).
    pub fn log_len(&self) -> u64 {
        let tail = self.tail();
        self.last_index_in(&tail)
            .saturating_sub(self.bounds().start_index)
    }

    fn tail(&self) -> MutexGuard<'_, Tail> {
        match self.inner.tail.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The log's last index: the tail's (it holds every entry not yet written), else the
    /// database's.
    fn last_index_in(&self, tail: &Tail) -> u64 {
        tail.last_index().unwrap_or(self.bounds().last_index)
    }

    /// The first index still in the log.
    pub fn first_index(&self) -> u64 {
        self.bounds().start_index + 1
    }
}

/// Opens (or creates) the redb file, verifying every page.
fn create_db(path: &Path) -> Result<Database, StoreError> {
    // Every page's checksum is verified at open: a file changed outside redb is an
    // error here, where a plain open may panic on it later.
    Database::builder()
        .set_check_integrity_on_open(true)
        .set_repair_callback(|session| {
            if session.progress() > 0.0 && session.progress() < 0.5 {
                tracing::warn!(
                    "the data file's last commit does not verify (a write cut short by a crash); going back to the commit before it"
                );
            }
        })
        .create(path)
        .map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                path: path.to_path_buf(),
            },
            source => StoreError::Open {
                path: path.to_path_buf(),
                source,
            },
        })
}

/// The format of a file that holds data in an older format than [`DATA_FORMAT`] (to
/// be migrated); `None` for a new file or one in this format. A newer format is refused,
/// naming both.
fn older_format(db: &Database, path: &Path) -> Result<Option<u8>, StoreError> {
    let txn = db.begin_read()?;
    let raft = match txn.open_table(RAFT) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let found = match raft.get(FORMAT)? {
        // Format 2 and later record their format as the value's last byte (after the
        // checksum), which every later format keeps, so that this build can name it.
        Some(v) => v.value().last().copied(),
        None if raft.first()?.is_none() => return Ok(None),
        None => Some(1),
    };
    match found {
        Some(f) if f > DATA_FORMAT => Err(StoreError::NewerFormat {
            path: path.to_path_buf(),
            found: f,
            reads: DATA_FORMAT,
        }),
        Some(f) if f < DATA_FORMAT => Ok(Some(f)),
        _ => Ok(None),
    }
}

/// Copies the data file to `<file>.format-<from>` (fsync'd) before a migration.
fn keep_copy(path: &Path, from: u8) -> Result<std::path::PathBuf, StoreError> {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".format-{from}"));
    let copy = std::path::PathBuf::from(name);
    let failed = |source| StoreError::MigrationCopy {
        path: path.to_path_buf(),
        source,
    };
    std::fs::copy(path, &copy).map_err(failed)?;
    std::fs::File::open(&copy)
        .and_then(|f| f.sync_all())
        .map_err(failed)?;
    Ok(copy)
}

/// Brings a file to the checksummed value format: a new file is marked, a file written
/// before checksums (no `format` key) has every value sealed in this one transaction,
/// and a file of an unknown (newer) format is refused.
fn upgrade(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut raft = txn.open_table(RAFT)?;
    if let Some(v) = meta(&raft, FORMAT)? {
        return match v.as_slice() {
            [FORMAT_CHECKSUMMED] => Ok(()),
            other => Err(corrupt(
                "format",
                format!("unknown data file format {other:?}"),
            )),
        };
    }
    let mut sealed = 0u64;
    let metas: Vec<(String, Vec<u8>)> = raft
        .iter()?
        .map(|r| r.map(|(k, v)| (k.value().to_string(), v.value().to_vec())))
        .collect::<Result<_, _>>()?;
    for (k, v) in metas {
        put_meta(&mut raft, &k, &v)?;
        sealed += 1;
    }
    let mut log = txn.open_table(LOG)?;
    let entries: Vec<(u64, Vec<u8>)> = log
        .iter()?
        .map(|r| r.map(|(k, v)| (k.value(), v.value().to_vec())))
        .collect::<Result<_, _>>()?;
    for (i, v) in entries {
        log.insert(i, seal(Slot::Log(i), &v).as_slice())?;
        sealed += 1;
    }
    let mut state = txn.open_table(STATE)?;
    let rows: Vec<(String, Vec<u8>, Vec<u8>)> = state
        .iter()?
        .map(|r| {
            r.map(|(k, v)| {
                let (t, key) = k.value();
                (t.to_string(), key.to_vec(), v.value().to_vec())
            })
        })
        .collect::<Result<_, _>>()?;
    for (t, key, v) in rows {
        state.insert(
            (t.as_str(), key.as_slice()),
            seal(Slot::Row(&t, &key), &v).as_slice(),
        )?;
        sealed += 1;
    }
    put_meta(&mut raft, FORMAT, &[FORMAT_CHECKSUMMED])?;
    if sealed > 0 {
        tracing::info!("data file upgraded: {sealed} values now carry checksums");
    }
    Ok(())
}
