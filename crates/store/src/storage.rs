use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;

use blixard_core::{decode_versioned, encode_versioned, ClusterId, NodeId, Row, State};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::persist::{merge, Job, Queue, Tail};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const RAFT: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const STATE: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("state");

const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
/// The index and term of the last entry discarded by compaction (or of the installed snapshot).
const LOG_START: &str = "log_start";
const APPLIED: &str = "applied";
const NODE: &str = "node";

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

fn corrupt(what: &'static str, detail: impl ToString) -> StoreError {
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

/// Who this node is, recorded when it initialises or joins a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub cluster_id: ClusterId,
    pub node_id: NodeId,
    /// Set when the node learns it was removed; such a data dir never starts again.
    pub removed: bool,
}

/// Everything one step of the raft loop writes, committed in one transaction.
#[derive(Default, Debug)]
pub struct WriteBatch {
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub rows: Vec<Row>,
    /// The applied index and the term of that entry.
    pub applied: Option<(u64, u64)>,
    pub conf_state: Option<ConfState>,
    /// Whether the commit must reach the disk before `write` returns. Raft requires it for
    /// new entries, term and vote (`Ready::must_sync`); a commit index or applied state
    /// that is lost in a crash is recovered from the log.
    pub sync: bool,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.hard_state.is_none()
            && self.rows.is_empty()
            && self.applied.is_none()
            && self.conf_state.is_none()
    }
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

/// Told, from the writer thread, the highest `Ready` number that is now durable, or the
/// error that stopped the writer.
pub type PersistNotify = Box<dyn Fn(Result<u64, String>) + Send>;

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

fn pb_decode<M: protobuf::Message>(what: &'static str, bytes: &[u8]) -> Result<M, StoreError> {
    M::parse_from_bytes(bytes).map_err(|e| corrupt(what, e))
}

fn pb_encode<M: protobuf::Message>(m: &M) -> Result<Vec<u8>, StoreError> {
    m.write_to_bytes()
        .map_err(|e| StoreError::Raft(raft::Error::CodecError(e)))
}

fn encode_pair(a: u64, b: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_be_bytes());
    out[8..].copy_from_slice(&b.to_be_bytes());
    out
}

fn decode_pair(what: &'static str, bytes: &[u8]) -> Result<(u64, u64), StoreError> {
    let arr: [u8; 16] = bytes
        .try_into()
        .map_err(|_| corrupt(what, format!("expected 16 bytes, found {}", bytes.len())))?;
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&arr[..8]);
    b.copy_from_slice(&arr[8..]);
    Ok((u64::from_be_bytes(a), u64::from_be_bytes(b)))
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
        let db = Database::create(path).map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                path: path.to_path_buf(),
            },
            source => StoreError::Open {
                path: path.to_path_buf(),
                source,
            },
        })?;
        {
            let mut txn = db.begin_write()?;
            txn.set_durability(durability)
                .map_err(|e| corrupt("durability", e))?;
            txn.open_table(LOG)?;
            txn.open_table(RAFT)?;
            txn.open_table(STATE)?;
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
        let (start_index, start_term) = match raft.get(LOG_START)? {
            Some(v) => decode_pair("log start", v.value())?,
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
        match raft.get(NODE)? {
            Some(v) => Ok(Some(
                decode_versioned(v.value()).map_err(|e| corrupt("node record", e))?,
            )),
            None => Ok(None),
        }
    }

    pub fn set_node_record(&self, record: &NodeRecord) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        {
            let mut raft = txn.open_table(RAFT)?;
            raft.insert(NODE, encode_versioned(record).as_slice())?;
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
            rows.push((t.to_string(), key.to_vec(), v.value().to_vec()));
        }
        let state = State::from_rows(
            rows.iter()
                .map(|(t, k, v)| (t.as_str(), k.as_slice(), v.as_slice())),
        )
        .map_err(|e| corrupt("state", e))?;
        let raft = txn.open_table(RAFT)?;
        let (applied, applied_term) = match raft.get(APPLIED)? {
            Some(v) => decode_pair("applied index", v.value())?,
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
                    log.insert(e.index, pb_encode(e)?.as_slice())?;
                }
                if let Some(last) = batch.entries.last() {
                    bounds.last_index = last.index;
                }
            }
            let mut raft = txn.open_table(RAFT)?;
            if let Some(hs) = &batch.hard_state {
                raft.insert(HARD_STATE, pb_encode(hs)?.as_slice())?;
            }
            if let Some(cs) = &batch.conf_state {
                raft.insert(CONF_STATE, pb_encode(cs)?.as_slice())?;
            }
            if let Some((index, term)) = batch.applied {
                raft.insert(APPLIED, encode_pair(index, term).as_slice())?;
            }
            let mut state = txn.open_table(STATE)?;
            for row in &batch.rows {
                match &row.value {
                    Some(v) => {
                        state.insert((row.table.as_str(), row.key.as_slice()), v.as_slice())?;
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
                    state.insert((row.table.as_str(), row.key.as_slice()), v.as_slice())?;
                }
            }
            let mut raft = txn.open_table(RAFT)?;
            raft.insert(HARD_STATE, pb_encode(&hs)?.as_slice())?;
            raft.insert(CONF_STATE, pb_encode(meta.get_conf_state())?.as_slice())?;
            raft.insert(LOG_START, encode_pair(meta.index, meta.term).as_slice())?;
            raft.insert(APPLIED, encode_pair(meta.index, meta.term).as_slice())?;
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
            raft.insert(LOG_START, encode_pair(index, term).as_slice())?;
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
        let (i, t) = match raft.get(APPLIED)? {
            Some(v) => decode_pair("applied index", v.value())?,
            None => (0, 0),
        };
        Ok((i, t))
    }

    pub fn hard_state(&self) -> Result<HardState, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let raft = txn.open_table(RAFT)?;
        match raft.get(HARD_STATE)? {
            Some(v) => pb_decode("hard state", v.value()),
            None => Ok(HardState::default()),
        }
    }

    pub fn conf_state(&self) -> Result<ConfState, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let raft = txn.open_table(RAFT)?;
        match raft.get(CONF_STATE)? {
            Some(v) => pb_decode("conf state", v.value()),
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

    // ---- asynchronous persistence (see `persist`) ----

    /// Makes appended entries readable through `raft::Storage` before they are written
    /// (raft-rs's asynchronous `Ready`). Queue the batch holding them with [`Store::submit`].
    pub fn stage(&self, entries: &[Entry]) {
        self.tail().append(entries);
    }

    /// Queues a batch; it is written after every batch queued before it. `ready` is the
    /// number reported once it is durable.
    pub fn submit(&self, batch: WriteBatch, ready: u64) {
        self.inner.queue.push(Job::Write {
            batch: Box::new(batch),
            ready,
        });
    }

    /// Queues a compaction up to `index`, applied by the batches queued before it.
    pub fn submit_compact(&self, index: u64) {
        self.inner.queue.push(Job::Compact(index));
    }

    /// Runs queued jobs on a writer thread from now on. `notify` hears of each group
    /// written (the highest `Ready` number in it) and of a failure, after which the writer
    /// stops and writes nothing more.
    pub fn start_writer(&self, notify: PersistNotify) -> std::io::Result<()> {
        self.inner.queue.lock().background = true;
        let store = self.clone();
        let handle = std::thread::Builder::new()
            .name("raft-writer".into())
            .spawn(move || store.writer_loop(notify))?;
        match self.inner.writer.lock() {
            Ok(mut w) => *w = Some(handle),
            Err(poisoned) => *poisoned.into_inner() = Some(handle),
        }
        Ok(())
    }

    fn writer_loop(&self, notify: PersistNotify) {
        let queue = &self.inner.queue;
        loop {
            let jobs: Vec<Job> = {
                let mut q = queue.lock();
                while q.jobs.is_empty() && !q.stop {
                    q = match queue.changed.wait(q) {
                        Ok(g) => g,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                }
                if q.jobs.is_empty() {
                    return;
                }
                q.busy = true;
                q.jobs.drain(..).collect()
            };
            let result = self.execute(jobs);
            {
                let mut q = queue.lock();
                q.busy = false;
                if let Err(e) = &result {
                    q.failed = Some(e.to_string());
                    q.jobs.clear();
                }
            }
            queue.changed.notify_all();
            match result {
                Ok(Some(number)) => notify(Ok(number)),
                Ok(None) => {}
                Err(e) => {
                    notify(Err(e.to_string()));
                    return;
                }
            }
        }
    }

    /// Writes jobs in order, consecutive batches in one transaction. Returns the highest
    /// `Ready` number written.
    fn execute(&self, jobs: Vec<Job>) -> Result<Option<u64>, StoreError> {
        let mut merged: Option<WriteBatch> = None;
        let mut top = None;
        for job in jobs {
            match job {
                Job::Write { batch, ready } => {
                    match merged.as_mut() {
                        Some(m) => merge(m, *batch),
                        None => merged = Some(*batch),
                    }
                    top = Some(ready);
                }
                Job::Compact(index) => {
                    if let Some(m) = merged.take() {
                        self.write(m)?;
                    }
                    self.compact(index)?;
                }
            }
        }
        if let Some(m) = merged {
            self.write(m)?;
        }
        Ok(top)
    }

    /// Without a writer thread: runs up to `max` queued jobs here and returns the highest
    /// `Ready` number written (simulations decide when writes happen).
    pub fn run_queued(&self, max: usize) -> Result<Option<u64>, StoreError> {
        let jobs: Vec<Job> = {
            let mut q = self.inner.queue.lock();
            if let Some(e) = &q.failed {
                return Err(corrupt("queued write", e));
            }
            let n = max.min(q.jobs.len());
            q.jobs.drain(..n).collect()
        };
        self.execute(jobs)
    }

    /// Waits until every queued job is written (or runs them, without a writer thread).
    /// Returns the highest `Ready` number this wrote, if it ran them itself.
    pub fn flush(&self) -> Result<Option<u64>, StoreError> {
        let queue = &self.inner.queue;
        let mut q = queue.lock();
        if !q.background {
            drop(q);
            return self.run_queued(usize::MAX);
        }
        loop {
            if let Some(e) = &q.failed {
                return Err(corrupt("queued write", e));
            }
            if q.jobs.is_empty() && !q.busy {
                return Ok(None);
            }
            q = match queue.changed.wait(q) {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
    }

    /// Writes what is queued, stops the writer thread and waits for it.
    pub fn stop_writer(&self) -> Result<(), StoreError> {
        let flushed = self.flush();
        self.inner.queue.lock().stop = true;
        self.inner.queue.changed.notify_all();
        let handle = match self.inner.writer.lock() {
            Ok(mut w) => w.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("the raft writer thread panicked");
            }
        }
        flushed.map(|_| ())
    }

    /// The first index still in the log.
    pub fn first_index(&self) -> u64 {
        self.bounds().start_index + 1
    }

    fn read_entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> Result<Vec<Entry>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let mut out = Vec::new();
        let mut size = 0u64;
        for item in log.range(low..high)? {
            let (k, v) = item?;
            let entry: Entry = pb_decode("log entry", v.value())?;
            if entry.index != k.value() {
                return Err(corrupt(
                    "log entry",
                    format!("key {} holds entry {}", k.value(), entry.index),
                ));
            }
            size += u64::from(entry.compute_size());
            // Always return at least one entry, as raft expects.
            if let Some(limit) = max_size {
                if !out.is_empty() && size > limit {
                    break;
                }
            }
            out.push(entry);
        }
        if out.len() as u64 != high - low && max_size.is_none_or(|l| size <= l) {
            return Err(corrupt(
                "log",
                format!("entries {low}..{high} are not all present"),
            ));
        }
        Ok(out)
    }

    fn build_snapshot(&self) -> Result<Snapshot, StoreError> {
        // One read transaction: rows, applied index and configuration agree.
        let txn = self.inner.db.begin_read()?;
        let raft = txn.open_table(RAFT)?;
        let (index, term) = match raft.get(APPLIED)? {
            Some(v) => decode_pair("applied index", v.value())?,
            None => (0, 0),
        };
        let conf: ConfState = match raft.get(CONF_STATE)? {
            Some(v) => pb_decode("conf state", v.value())?,
            None => ConfState::default(),
        };
        let table = txn.open_table(STATE)?;
        let mut rows = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            let (t, key) = k.value();
            rows.push(Row {
                table: t.to_string(),
                key: key.to_vec(),
                value: Some(v.value().to_vec()),
            });
        }
        let mut snap = Snapshot::default();
        let mut meta = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        meta.set_conf_state(conf);
        snap.set_metadata(meta);
        snap.data = encode_versioned(&rows).into();
        Ok(snap)
    }
}

impl raft::Storage for Store {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state()?,
            conf_state: self.conf_state()?,
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        let tail = self.tail();
        let b = self.bounds();
        if low <= b.start_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        let last = self.last_index_in(&tail);
        if high > last + 1 || low > high {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        // Below the tail from the database, the rest from the tail.
        let tail_first = tail.first_index().unwrap_or(last + 1);
        let mut out = Vec::new();
        let mut size = 0u64;
        if low < tail_first {
            out = self.read_entries(low, high.min(tail_first), max_size)?;
            size = out.iter().map(|e| u64::from(e.compute_size())).sum();
            if (out.len() as u64) < high.min(tail_first) - low {
                return Ok(out);
            }
        }
        for index in low.max(tail_first)..high {
            let Some(e) = tail.get(index) else {
                return Err(
                    StoreError::Raft(raft::Error::Store(RaftStorageError::Unavailable)).into(),
                );
            };
            size += u64::from(e.compute_size());
            // Always return at least one entry, as raft expects.
            if max_size.is_some_and(|l| !out.is_empty() && size > l) {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let tail = self.tail();
        let b = self.bounds();
        if idx == b.start_index {
            return Ok(b.start_term);
        }
        if idx < b.start_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if let Some(e) = tail.get(idx) {
            return Ok(e.term);
        }
        if idx > self.last_index_in(&tail) {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        let entries = self.read_entries(idx, idx + 1, None)?;
        entries
            .first()
            .map(|e| e.term)
            .ok_or(raft::Error::Store(RaftStorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.bounds().start_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        let tail = self.tail();
        Ok(self.last_index_in(&tail))
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let snap = self.build_snapshot()?;
        if snap.get_metadata().index < request_index {
            return Err(raft::Error::Store(
                RaftStorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snap)
    }
}
