//! The storage contract: `blixard_store::Store` against raft-rs `Storage` semantics.
//!
//! The raft-rs part is modelled on raft-rs 0.7's own `MemStorage` tests. Two deliberate
//! differences from `MemStorage`, both the etcd convention raft-rs itself follows:
//!
//! * the log always starts after a snapshot (or compaction point), whose index and term
//!   stay answerable by `term`; a `MemStorage` whose `entries` were replaced by hand has no
//!   such dummy entry;
//! * `Store::compact(i)` discards entries up to and *including* `i` (the compaction point
//!   becomes `i`, `first_index` becomes `i + 1`), and only applied entries may be
//!   discarded; `MemStorage::compact(i)` keeps `i`.
//!
//! Beyond raft-rs: restart, corruption, locking and bootstrap.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use blixard_core::{
    encode_versioned, Capacity, ClusterId, Command, EndpointKey, NewMember, NodeId, Row, State,
};
use blixard_store::{seal, NodeRecord, Slot, Store, StoreError, WriteBatch};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{Error as RaftError, GetEntriesContext, Storage, StorageError};
use tempfile::TempDir;

const NO_LIMIT: u64 = u64::MAX;

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

fn new_entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        ..Default::default()
    }
}

fn entry_with_data(index: u64, term: u64, data: &[u8]) -> Entry {
    let mut e = new_entry(index, term);
    e.data = data.to_vec().into();
    e
}

fn size_of(e: &Entry) -> u64 {
    u64::from(e.compute_size())
}

fn conf(voters: &[u64], learners: &[u64]) -> ConfState {
    ConfState {
        voters: voters.to_vec(),
        learners: learners.to_vec(),
        ..Default::default()
    }
}

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote,
        commit,
        ..Default::default()
    }
}

fn snapshot_of(state: &State, index: u64, term: u64, voters: &[u64]) -> Snapshot {
    let mut s = Snapshot::default();
    s.mut_metadata().index = index;
    s.mut_metadata().term = term;
    s.mut_metadata().set_conf_state(conf(voters, &[]));
    s.data = encode_versioned(&state.all_rows()).into();
    s
}

fn member(n: u8) -> NewMember {
    NewMember {
        name: format!("node{n}"),
        endpoint: EndpointKey([n; 32]),
        addrs: vec![std::net::SocketAddr::from((
            [127, 0, 0, 1],
            7000 + u16::from(n),
        ))],
        labels: Default::default(),
        capacity: Capacity {
            vcpus: 2,
            memory_mib: 1024,
        },
    }
}

/// A state after `Command::Bootstrap`, with its changes drained.
fn bootstrapped_state() -> State {
    let mut s = State::new();
    s.apply(&Command::Bootstrap {
        cluster_id: ClusterId([7; 16]),
        name: "contract".into(),
        member: member(1),
        admin: EndpointKey([200; 32]),
        now_ms: 1_000,
    })
    .unwrap();
    s.drain_changes();
    s
}

fn set_meta(state: &mut State, key: &str, value: Option<&str>) -> Vec<Row> {
    state
        .apply(&Command::SetMeta {
            key: key.into(),
            value: value.map(str::to_string),
        })
        .unwrap();
    state.drain_changes()
}

fn db_path(dir: &TempDir) -> PathBuf {
    dir.path().join("blixard.redb")
}

fn open(path: &Path) -> Store {
    Store::open(path).unwrap()
}

/// A store at `path` holding an empty state snapshot at index 2 (term 2), voters 1–3.
fn open_from_snapshot(path: &Path) -> Store {
    let store = open(path);
    store
        .apply_snapshot(&snapshot_of(&State::new(), 2, 2, &[1, 2, 3]))
        .unwrap();
    store
}

fn new_store() -> (TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db_path(&dir));
    (dir, store)
}

/// The fixture of the raft-rs tests: entries 3, 4, 5 with terms 3, 4, 5. Here they follow
/// a snapshot at index 2, term 2, which is how a real log starts after a compaction.
fn store_345() -> (TempDir, Store) {
    store_with(&[(3, 3), (4, 4), (5, 5)])
}

fn store_with(entries: &[(u64, u64)]) -> (TempDir, Store) {
    let (dir, store) = new_store();
    store
        .apply_snapshot(&snapshot_of(&State::new(), 2, 2, &[1, 2, 3]))
        .unwrap();
    store
        .write(WriteBatch {
            entries: entries.iter().map(|&(i, t)| new_entry(i, t)).collect(),
            ..Default::default()
        })
        .unwrap();
    (dir, store)
}

fn all_entries(store: &Store) -> Vec<Entry> {
    let first = Storage::first_index(store).unwrap();
    let last = Storage::last_index(store).unwrap();
    store.entries(first, last + 1, NO_LIMIT, ctx()).unwrap()
}

fn set_applied(store: &Store, index: u64, term: u64) {
    store
        .write(WriteBatch {
            applied: Some((index, term)),
            ..Default::default()
        })
        .unwrap();
}

fn compacted<T>() -> raft::Result<T> {
    Err(RaftError::Store(StorageError::Compacted))
}

fn unavailable<T>() -> raft::Result<T> {
    Err(RaftError::Store(StorageError::Unavailable))
}

// ---------------------------------------------------------------------------------------
// raft-rs Storage semantics
// ---------------------------------------------------------------------------------------

#[test]
fn term() {
    let (_dir, store) = store_345();
    let cases: Vec<(u64, raft::Result<u64>)> = vec![
        (0, compacted()),
        (1, compacted()),
        // The snapshot's index and term stay answerable.
        (2, Ok(2)),
        (3, Ok(3)),
        (4, Ok(4)),
        (5, Ok(5)),
        (6, unavailable()),
        (u64::MAX, unavailable()),
    ];
    for (idx, want) in cases {
        assert_eq!(store.term(idx), want, "term({idx})");
    }
}

#[test]
fn term_of_an_empty_store_is_zero_at_index_zero() {
    let (_dir, store) = new_store();
    assert_eq!(store.term(0), Ok(0));
    assert_eq!(store.term(1), unavailable());
    assert_eq!(Storage::first_index(&store), Ok(1));
    assert_eq!(Storage::last_index(&store), Ok(0));
    let state = store.initial_state().unwrap();
    assert_eq!(state.hard_state, HardState::default());
    assert_eq!(state.conf_state, ConfState::default());
}

#[test]
fn entries() {
    let ents = [
        new_entry(3, 3),
        new_entry(4, 4),
        new_entry(5, 5),
        new_entry(6, 6),
    ];
    let (_dir, store) = store_with(&[(3, 3), (4, 4), (5, 5), (6, 6)]);
    let e = |i: u64| new_entry(i, i);
    let cases: Vec<(u64, u64, u64, raft::Result<Vec<Entry>>)> = vec![
        (2, 6, NO_LIMIT, compacted()),
        (1, 3, NO_LIMIT, compacted()),
        (3, 4, NO_LIMIT, Ok(vec![e(3)])),
        (4, 5, NO_LIMIT, Ok(vec![e(4)])),
        (4, 6, NO_LIMIT, Ok(vec![e(4), e(5)])),
        (4, 7, NO_LIMIT, Ok(vec![e(4), e(5), e(6)])),
        (3, 7, NO_LIMIT, Ok(vec![e(3), e(4), e(5), e(6)])),
        // Even if max_size is zero, the first entry is returned.
        (4, 7, 0, Ok(vec![e(4)])),
        // Limited to two.
        (
            4,
            7,
            size_of(&ents[1]) + size_of(&ents[2]),
            Ok(vec![e(4), e(5)]),
        ),
        (
            4,
            7,
            size_of(&ents[1]) + size_of(&ents[2]) + size_of(&ents[3]) / 2,
            Ok(vec![e(4), e(5)]),
        ),
        (
            4,
            7,
            size_of(&ents[1]) + size_of(&ents[2]) + size_of(&ents[3]) - 1,
            Ok(vec![e(4), e(5)]),
        ),
        // All.
        (
            4,
            7,
            size_of(&ents[1]) + size_of(&ents[2]) + size_of(&ents[3]),
            Ok(vec![e(4), e(5), e(6)]),
        ),
    ];
    for (i, (lo, hi, max, want)) in cases.into_iter().enumerate() {
        let got = store.entries(lo, hi, max, ctx());
        assert_eq!(got, want, "case #{i}: entries({lo}, {hi}, {max})");
    }
    // `None` means no limit as well.
    assert_eq!(store.entries(3, 7, None, ctx()).unwrap().len(), 4);
}

#[test]
fn entries_max_size_counts_entry_data() {
    let (_dir, store) = new_store();
    let big = vec![0xab; 1000];
    let ents: Vec<Entry> = (1..=5).map(|i| entry_with_data(i, 1, &big)).collect();
    store
        .write(WriteBatch {
            entries: ents.clone(),
            ..Default::default()
        })
        .unwrap();
    let one = size_of(&ents[0]);
    assert_eq!(store.entries(1, 6, one * 3, ctx()).unwrap(), ents[..3]);
    assert_eq!(store.entries(1, 6, one * 3 - 1, ctx()).unwrap(), ents[..2]);
    // A single entry larger than the limit still comes back alone.
    assert_eq!(store.entries(2, 6, 10, ctx()).unwrap(), ents[1..2]);
    assert_eq!(store.entries(1, 6, NO_LIMIT, ctx()).unwrap(), ents);
}

#[test]
fn entries_out_of_range_are_errors_not_panics() {
    let (_dir, store) = store_345();
    // Beyond the last index.
    assert_eq!(store.entries(4, 7, NO_LIMIT, ctx()), unavailable());
    assert_eq!(store.entries(6, 7, NO_LIMIT, ctx()), unavailable());
    assert_eq!(store.entries(100, 200, NO_LIMIT, ctx()), unavailable());
    assert!(store.entries(u64::MAX - 1, u64::MAX, 0, ctx()).is_err());
    // Inverted range.
    assert!(store.entries(5, 4, NO_LIMIT, ctx()).is_err());
    // Compacted.
    assert_eq!(store.entries(0, 4, NO_LIMIT, ctx()), compacted());
    // An empty range at the end is allowed and empty.
    assert_eq!(store.entries(6, 6, NO_LIMIT, ctx()), Ok(vec![]));
}

#[test]
fn last_index() {
    let (_dir, store) = store_345();
    assert_eq!(Storage::last_index(&store), Ok(5));
    store
        .write(WriteBatch {
            entries: vec![new_entry(6, 5)],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(Storage::last_index(&store), Ok(6));
}

#[test]
fn first_index() {
    let (_dir, store) = store_345();
    assert_eq!(Storage::first_index(&store), Ok(3));
    assert_eq!(store.first_index(), 3);
    set_applied(&store, 5, 5);
    // Store::compact(i) discards i itself: the log now starts at 4.
    store.compact(3).unwrap();
    assert_eq!(Storage::first_index(&store), Ok(4));
    assert_eq!(store.first_index(), 4);
    assert_eq!(store.log_len(), 2);
}

#[test]
fn compact() {
    // (compact to, first index, term of the first entry, entries left)
    let cases = [
        (1, 3, 3, 3), // below the compaction point: nothing happens
        (2, 3, 3, 3), // at the compaction point: nothing happens
        (3, 4, 4, 2),
        (4, 5, 5, 1),
        (5, 6, 0, 0),
    ];
    for (i, (idx, want_first, want_term, want_len)) in cases.into_iter().enumerate() {
        let (_dir, store) = store_345();
        set_applied(&store, 5, 5);
        store.compact(idx).unwrap();
        let first = Storage::first_index(&store).unwrap();
        assert_eq!(first, want_first, "case #{i}: first index");
        let term = store
            .entries(first, first + 1, 1, ctx())
            .map_or(0, |v| v.first().map_or(0, |e| e.term));
        assert_eq!(term, want_term, "case #{i}: term of first entry");
        let last = Storage::last_index(&store).unwrap();
        assert_eq!(last, 5, "case #{i}: compaction never moves the last index");
        let len = store.entries(first, last + 1, 100, ctx()).unwrap().len();
        assert_eq!(len, want_len, "case #{i}: entries left");
        // The compaction point's term stays answerable; below it is gone.
        let point = first - 1;
        assert_eq!(
            store.term(point),
            Ok(point.max(2)),
            "case #{i}: term({point})"
        );
        assert_eq!(store.term(point - 1), compacted(), "case #{i}");
        assert_eq!(store.entries(point, last + 1, NO_LIMIT, ctx()), compacted());
        assert_eq!(store.log_len(), want_len as u64);
    }
}

#[test]
fn compact_refuses_unapplied_or_missing_entries() {
    let (_dir, store) = store_345();
    // Nothing applied yet: nothing may be discarded.
    assert!(matches!(store.compact(3), Err(StoreError::Corrupt { .. })));
    set_applied(&store, 4, 4);
    assert!(store.compact(5).is_err(), "index 5 is not applied");
    set_applied(&store, 9, 9);
    assert!(store.compact(6).is_err(), "index 6 is not in the log");
    // The failed attempts changed nothing.
    assert_eq!(Storage::first_index(&store), Ok(3));
    assert_eq!(Storage::last_index(&store), Ok(5));
    store.compact(4).unwrap();
    assert_eq!(Storage::first_index(&store), Ok(5));
}

#[test]
fn snapshot() {
    // The store builds snapshots at its applied index: rows, conf state and applied index
    // are read in one transaction, so they agree.
    let (_dir, store) = store_345();
    let mut state = bootstrapped_state();
    set_meta(&mut state, "owner", Some("ops"));
    store
        .write(WriteBatch {
            rows: state.all_rows(),
            applied: Some((4, 4)),
            conf_state: Some(conf(&[1, 2, 3], &[4])),
            hard_state: Some(hard_state(5, 1, 5)),
            ..Default::default()
        })
        .unwrap();
    for request in [0, 3, 4] {
        let snap = store.snapshot(request, 2).unwrap();
        let meta = snap.get_metadata();
        assert_eq!((meta.index, meta.term), (4, 4), "request {request}");
        assert_eq!(meta.get_conf_state(), &conf(&[1, 2, 3], &[4]));
        let rows: Vec<Row> = blixard_core::decode_versioned(&snap.data).unwrap();
        let loaded = State::from_rows(rows.iter().map(|r| {
            (
                r.table.as_str(),
                r.key.as_slice(),
                r.value.as_deref().unwrap(),
            )
        }))
        .unwrap();
        assert_eq!(loaded.digest(), state.digest());
    }
    // Asking for a newer snapshot than the store can build is a temporary condition.
    assert_eq!(
        store.snapshot(5, 2),
        Err(RaftError::Store(
            StorageError::SnapshotTemporarilyUnavailable
        ))
    );
}

#[test]
fn snapshot_round_trips_between_stores() {
    let (_dir_a, a) = store_345();
    let mut state = bootstrapped_state();
    let mut rows = state.all_rows();
    rows.extend(set_meta(&mut state, "k", Some("v")));
    a.write(WriteBatch {
        rows,
        applied: Some((5, 5)),
        conf_state: Some(conf(&[1, 2, 3], &[])),
        hard_state: Some(hard_state(5, 2, 5)),
        ..Default::default()
    })
    .unwrap();
    let snap = a.snapshot(0, 2).unwrap();

    let (_dir_b, b) = new_store();
    b.apply_snapshot(&snap).unwrap();
    let (loaded, applied, applied_term) = b.load_state().unwrap();
    assert_eq!(loaded.digest(), state.digest());
    assert_eq!(loaded.meta_get("k").map(String::as_str), Some("v"));
    assert_eq!((applied, applied_term), (5, 5));
    assert_eq!(b.conf_state().unwrap(), conf(&[1, 2, 3], &[]));
    assert_eq!(Storage::first_index(&b), Ok(6));
    assert_eq!(Storage::last_index(&b), Ok(5));
    assert_eq!(b.term(5), Ok(5));
    let hs = b.hard_state().unwrap();
    assert_eq!((hs.term, hs.commit), (5, 5));
    // A snapshot built from the snapshot is the same snapshot.
    assert_eq!(b.snapshot(0, 1).unwrap(), snap);
}

#[test]
fn append() {
    let e = new_entry;
    let cases: Vec<(Vec<Entry>, Option<Vec<Entry>>)> = vec![
        (
            vec![e(3, 3), e(4, 4), e(5, 5)],
            Some(vec![e(3, 3), e(4, 4), e(5, 5)]),
        ),
        (
            vec![e(3, 3), e(4, 6), e(5, 6)],
            Some(vec![e(3, 3), e(4, 6), e(5, 6)]),
        ),
        (
            vec![e(3, 3), e(4, 4), e(5, 5), e(6, 5)],
            Some(vec![e(3, 3), e(4, 4), e(5, 5), e(6, 5)]),
        ),
        // Overwriting compacted entries is not allowed.
        (vec![e(2, 3), e(3, 3), e(4, 5)], None),
        // Truncate the conflicting tail and append.
        (vec![e(4, 5)], Some(vec![e(3, 3), e(4, 5)])),
        // Direct append.
        (
            vec![e(6, 6)],
            Some(vec![e(3, 3), e(4, 4), e(5, 5), e(6, 6)]),
        ),
        // A gap is refused.
        (vec![e(7, 6)], None),
    ];
    for (i, (entries, want)) in cases.into_iter().enumerate() {
        let (dir, store) = store_345();
        let before = all_entries(&store);
        let res = store.write(WriteBatch {
            entries,
            // A failed append must not half-commit the rest of the batch either.
            hard_state: Some(hard_state(9, 9, 3)),
            ..Default::default()
        });
        match want {
            Some(want) => {
                res.unwrap();
                assert_eq!(all_entries(&store), want, "case #{i}");
                assert_eq!(Storage::last_index(&store), Ok(want.last().unwrap().index));
                assert_eq!(store.hard_state().unwrap(), hard_state(9, 9, 3));
                // The truncated tail stays truncated after a restart.
                drop(store);
                let store = open(&db_path(&dir));
                assert_eq!(all_entries(&store), want, "case #{i} after restart");
            }
            None => {
                assert!(res.is_err(), "case #{i}: expected an error");
                assert_eq!(all_entries(&store), before, "case #{i}: log changed");
                assert_eq!(store.hard_state().unwrap().term, 2, "case #{i}");
            }
        }
    }
}

#[test]
fn append_to_compacted_index_is_reported_as_compacted() {
    let (_dir, store) = store_345();
    let err = store
        .write(WriteBatch {
            entries: vec![new_entry(2, 2)],
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Raft(RaftError::Store(StorageError::Compacted))
        ),
        "{err:?}"
    );
}

#[test]
fn apply_snapshot() {
    let (_dir, store) = store_345();
    let mut old_state = bootstrapped_state();
    let old_rows = set_meta(&mut old_state, "old", Some("1"));
    store
        .write(WriteBatch {
            rows: old_rows,
            hard_state: Some(hard_state(5, 2, 4)),
            applied: Some((4, 4)),
            conf_state: Some(conf(&[1, 2, 3], &[])),
            ..Default::default()
        })
        .unwrap();

    let mut new_state = bootstrapped_state();
    set_meta(&mut new_state, "new", Some("2"));
    store
        .apply_snapshot(&snapshot_of(&new_state, 10, 6, &[1, 2, 3, 4]))
        .unwrap();

    // The whole log is replaced: it now starts after the snapshot.
    assert_eq!(Storage::first_index(&store), Ok(11));
    assert_eq!(Storage::last_index(&store), Ok(10));
    assert_eq!(store.term(10), Ok(6));
    assert_eq!(store.term(9), compacted());
    assert_eq!(store.term(11), unavailable());
    assert_eq!(store.entries(5, 6, NO_LIMIT, ctx()), compacted());
    // Hard state: term and commit move up to the snapshot.
    let hs = store.hard_state().unwrap();
    assert_eq!((hs.term, hs.commit), (6, 10));
    assert_eq!(store.conf_state().unwrap(), conf(&[1, 2, 3, 4], &[]));
    // State rows are replaced, not merged.
    let (loaded, applied, applied_term) = store.load_state().unwrap();
    assert_eq!((applied, applied_term), (10, 6));
    assert_eq!(loaded.digest(), new_state.digest());
    assert_eq!(loaded.meta_get("old"), None);
    assert_eq!(loaded.meta_get("new").map(String::as_str), Some("2"));
    // Appending continues after the snapshot.
    store
        .write(WriteBatch {
            entries: vec![new_entry(11, 6)],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(Storage::last_index(&store), Ok(11));
    assert_eq!(store.term(11), Ok(6));
}

#[test]
fn apply_snapshot_with_bad_data_changes_nothing() {
    let (_dir, store) = store_345();
    set_applied(&store, 4, 4);
    let mut bad = snapshot_of(&State::new(), 10, 6, &[1]);
    for data in [
        Vec::new(),
        vec![0xff; 16],
        vec![blixard_core::FORMAT_VERSION, 0xff, 0xff, 0xff],
        // Rows of a table this build does not know.
        encode_versioned(&vec![Row {
            table: "vms_v9".into(),
            key: vec![1],
            value: Some(vec![1]),
        }]),
    ] {
        bad.data = data.into();
        assert!(store.apply_snapshot(&bad).is_err());
        assert_eq!(Storage::first_index(&store), Ok(3));
        assert_eq!(Storage::last_index(&store), Ok(5));
        assert_eq!(store.applied().unwrap(), (4, 4));
        assert_eq!(store.conf_state().unwrap(), conf(&[1, 2, 3], &[]));
    }
}

// ---------------------------------------------------------------------------------------
// State rows and the applied index
// ---------------------------------------------------------------------------------------

#[test]
fn rows_and_applied_index_are_written_together_and_deletes_apply() {
    let (_dir, store) = new_store();
    let mut state = bootstrapped_state();
    let mut rows = state.all_rows();
    rows.extend(set_meta(&mut state, "a", Some("1")));
    rows.extend(set_meta(&mut state, "b", Some("2")));
    store
        .write(WriteBatch {
            rows,
            applied: Some((3, 1)),
            ..Default::default()
        })
        .unwrap();
    let rows = set_meta(&mut state, "a", None);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].value, None);
    store
        .write(WriteBatch {
            rows,
            applied: Some((4, 1)),
            ..Default::default()
        })
        .unwrap();
    let (loaded, applied, term) = store.load_state().unwrap();
    assert_eq!((applied, term), (4, 1));
    assert_eq!(loaded.meta_get("a"), None);
    assert_eq!(loaded.meta_get("b").map(String::as_str), Some("2"));
    assert_eq!(loaded.digest(), state.digest());
}

#[test]
fn an_empty_batch_is_a_no_op() {
    let (_dir, store) = store_345();
    assert!(WriteBatch::default().is_empty());
    store.write(WriteBatch::default()).unwrap();
    assert_eq!(Storage::last_index(&store), Ok(5));
}

// ---------------------------------------------------------------------------------------
// Queued (asynchronous) writes
// ---------------------------------------------------------------------------------------

fn terms(entries: &[Entry]) -> Vec<(u64, u64)> {
    entries.iter().map(|e| (e.index, e.term)).collect()
}

fn batch_of(entries: &[(u64, u64)]) -> WriteBatch {
    WriteBatch {
        entries: entries.iter().map(|&(i, t)| new_entry(i, t)).collect(),
        sync: true,
        ..Default::default()
    }
}

/// Stages and queues entries, as the raft core does with a `Ready`.
fn queue(store: &Store, entries: &[(u64, u64)], ready: u64) {
    let batch = batch_of(entries);
    store.stage(&batch.entries);
    store.submit(batch, ready);
}

/// Starts the store's writer thread; what it reports arrives on the receiver.
fn start_writer(store: &Store) -> std::sync::mpsc::Receiver<Result<u64, StoreError>> {
    let (tx, rx) = std::sync::mpsc::channel();
    store
        .start_writer(Box::new(move |done| {
            let _ = tx.send(done.map(|p| p.ready));
        }))
        .unwrap();
    rx
}

#[test]
fn staged_entries_are_readable_before_they_are_written_and_lost_if_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let store = open_from_snapshot(&path);
        queue(&store, &[(3, 3), (4, 3)], 1);
        queue(&store, &[(5, 4)], 2);
        assert_eq!(Storage::last_index(&store), Ok(5));
        assert_eq!(store.term(5), Ok(4));
        assert_eq!(terms(&all_entries(&store)), vec![(3, 3), (4, 3), (5, 4)]);
        // Only the first job is written: the second is lost with the process.
        assert_eq!(store.run_queued(1).unwrap(), Some(1));
    }
    let store = open(&path);
    assert_eq!(terms(&all_entries(&store)), vec![(3, 3), (4, 3)]);
}

#[test]
fn a_queued_conflicting_append_replaces_the_tail_in_memory_and_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let store = open_from_snapshot(&path);
        queue(&store, &[(3, 3), (4, 3), (5, 3)], 1);
        assert_eq!(store.run_queued(usize::MAX).unwrap(), Some(1));
        // Written entries 4 and 5 are replaced before the replacement is written.
        queue(&store, &[(4, 5)], 2);
        assert_eq!(terms(&all_entries(&store)), vec![(3, 3), (4, 5)]);
        assert_eq!(store.term(5), unavailable());
        // Two queued batches, the second conflicting with the first, in one transaction.
        queue(&store, &[(5, 5), (6, 5)], 3);
        queue(&store, &[(6, 6), (7, 6)], 4);
        assert_eq!(store.flush().unwrap(), Some(4));
    }
    let store = open(&path);
    assert_eq!(
        terms(&all_entries(&store)),
        vec![(3, 3), (4, 5), (5, 5), (6, 6), (7, 6)]
    );
}

#[test]
fn a_queued_compaction_runs_after_the_batches_before_it() {
    let (_dir, store) = store_345();
    queue(&store, &[(6, 5), (7, 5)], 1);
    store.submit(
        WriteBatch {
            applied: Some((6, 5)),
            ..Default::default()
        },
        2,
    );
    store.submit_compact(6);
    // Nothing happened yet.
    assert_eq!(Storage::first_index(&store), Ok(3));
    assert_eq!(store.flush().unwrap(), Some(2));
    assert_eq!(Storage::first_index(&store), Ok(7));
    assert_eq!(store.term(6), Ok(5));
    assert_eq!(terms(&all_entries(&store)), vec![(7, 5)]);
}

#[test]
fn the_writer_thread_reports_each_group_in_order_and_stops_after_writing_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let store = open_from_snapshot(&path);
        let rx = start_writer(&store);
        for n in 1..=50u64 {
            queue(&store, &[(n + 2, 1)], n);
        }
        store.stop_writer().unwrap();
        let reported: Vec<u64> = rx.try_iter().map(|r| r.unwrap()).collect();
        assert!(!reported.is_empty());
        assert!(reported.windows(2).all(|w| w[0] < w[1]), "{reported:?}");
        assert_eq!(reported.last(), Some(&50));
    }
    let store = open(&path);
    assert_eq!(Storage::last_index(&store), Ok(52));
}

#[test]
fn a_failed_queued_write_is_reported_and_nothing_after_it_is_written() {
    let (dir, store) = store_345();
    // Nothing is applied: compacting is refused.
    store.submit_compact(5);
    queue(&store, &[(6, 5)], 2);
    let rx = start_writer(&store);
    let first = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    let err = first.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("cannot compact"), "{err}");
    assert!(matches!(store.flush(), Err(StoreError::Corrupt { .. })));
    assert!(store.stop_writer().is_err());
    // Entry 6 was staged but never written.
    let path = db_path(&dir);
    drop(store);
    let store = open(&path);
    assert_eq!(Storage::last_index(&store), Ok(5));
}

/// A batch with no entries and no vote: the applied state `(index, term)`, unsynced.
fn applied_batch(index: u64, term: u64) -> WriteBatch {
    WriteBatch {
        applied: Some((index, term)),
        ..Default::default()
    }
}

/// Starts the writer; each report arrives with whether the group reached the file.
fn start_writer_reporting(store: &Store) -> std::sync::mpsc::Receiver<(u64, bool)> {
    let (tx, rx) = std::sync::mpsc::channel();
    store
        .start_writer(Box::new(move |done| {
            let done = done.unwrap();
            let _ = tx.send((done.ready, done.took.is_some()));
        }))
        .unwrap();
    rx
}

fn next_report(rx: &std::sync::mpsc::Receiver<(u64, bool)>) -> (u64, bool) {
    rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap()
}

#[test]
fn an_unsynced_batch_is_reported_at_once_and_written_with_the_next_synced_one() {
    let (_dir, store) = store_345();
    let rx = start_writer_reporting(&store);
    store.submit(applied_batch(3, 3), 1);
    // Reported without being written: it is held for the next batch.
    assert_eq!(next_report(&rx), (1, false));
    queue(&store, &[(6, 5)], 2);
    assert_eq!(next_report(&rx), (2, true));
    assert_eq!(store.applied().unwrap(), (3, 3));
    assert_eq!(Storage::last_index(&store), Ok(6));
    // Synced batches are never held.
    queue(&store, &[(7, 5)], 3);
    assert_eq!(next_report(&rx), (3, true));
    store.stop_writer().unwrap();
}

#[test]
fn a_held_batch_is_written_on_its_own_after_a_while_by_flush_and_at_stop() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let store = open_from_snapshot(&path);
        queue(&store, &[(3, 3), (4, 3), (5, 3)], 1);
        store.flush().unwrap();
        let rx = start_writer_reporting(&store);

        // Nothing follows: the writer writes it within its carry time.
        store.submit(applied_batch(3, 3), 2);
        assert_eq!(next_report(&rx), (2, false));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while store.applied().unwrap() != (3, 3) {
            assert!(
                std::time::Instant::now() < deadline,
                "the held batch was never written"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }

        // flush waits for a held batch too.
        store.submit(applied_batch(4, 3), 3);
        store.flush().unwrap();
        assert_eq!(store.applied().unwrap(), (4, 3));
        // (Held or written at once, depending on whether the writer saw it before the
        // flush did.)
        assert_eq!(next_report(&rx).0, 3);

        // So does stopping.
        store.submit(applied_batch(5, 3), 4);
        assert_eq!(next_report(&rx), (4, false));
        store.stop_writer().unwrap();
    }
    let store = open(&path);
    assert_eq!(store.applied().unwrap(), (5, 3));
}

// ---------------------------------------------------------------------------------------
// Restart, corruption, locking
// ---------------------------------------------------------------------------------------

#[test]
fn restart_preserves_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let mut state = bootstrapped_state();
    let record = NodeRecord {
        cluster_id: ClusterId([7; 16]),
        node_id: NodeId(2),
        removed: false,
    };
    {
        let store = open(&path);
        store.bootstrap(&state, &[1, 2, 3]).unwrap();
        store.set_node_record(&record).unwrap();
        let entries: Vec<Entry> = (2..=30)
            .map(|i| entry_with_data(i, 2 + i / 10, format!("e{i}").as_bytes()))
            .collect();
        let rows = set_meta(&mut state, "owner", Some("ops"));
        store
            .write(WriteBatch {
                entries,
                hard_state: Some(hard_state(5, 3, 25)),
                rows,
                applied: Some((20, 4)),
                conf_state: Some(conf(&[1, 2, 3], &[4])),
                sync: true,
            })
            .unwrap();
        store.compact(15).unwrap();
        assert_eq!(store.term(15), Ok(3));
    }
    let store = open(&path);
    assert_eq!(store.hard_state().unwrap(), hard_state(5, 3, 25));
    let raft_state = store.initial_state().unwrap();
    assert_eq!(raft_state.hard_state, hard_state(5, 3, 25));
    assert_eq!(raft_state.conf_state, conf(&[1, 2, 3], &[4]));
    assert_eq!(store.node_record().unwrap(), Some(record));
    let (loaded, applied, applied_term) = store.load_state().unwrap();
    assert_eq!((applied, applied_term), (20, 4));
    assert_eq!(store.applied().unwrap(), (20, 4));
    assert_eq!(loaded.digest(), state.digest());
    assert_eq!(loaded.meta_get("owner").map(String::as_str), Some("ops"));
    // The compaction point and the log.
    assert_eq!(Storage::first_index(&store), Ok(16));
    assert_eq!(Storage::last_index(&store), Ok(30));
    assert_eq!(store.term(15), Ok(3));
    assert_eq!(store.term(14), compacted());
    let entries = all_entries(&store);
    assert_eq!(entries.len(), 15);
    for e in &entries {
        assert_eq!(e.term, 2 + e.index / 10);
        assert_eq!(&e.data[..], format!("e{}", e.index).as_bytes());
    }
}

#[test]
fn restart_after_a_snapshot_with_an_empty_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let state = bootstrapped_state();
    {
        let store = open(&path);
        store
            .apply_snapshot(&snapshot_of(&state, 42, 7, &[1, 2, 3]))
            .unwrap();
    }
    let store = open(&path);
    assert_eq!(Storage::first_index(&store), Ok(43));
    assert_eq!(Storage::last_index(&store), Ok(42));
    assert_eq!(store.term(42), Ok(7));
    assert_eq!(store.applied().unwrap(), (42, 7));
    assert_eq!(store.load_state().unwrap().0.digest(), state.digest());
}

#[test]
fn volatile_store_survives_a_clean_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let store = Store::open_volatile(&path).unwrap();
        store
            .write(WriteBatch {
                entries: vec![new_entry(1, 1), new_entry(2, 1)],
                hard_state: Some(hard_state(1, 1, 2)),
                ..Default::default()
            })
            .unwrap();
    }
    let store = Store::open_volatile(&path).unwrap();
    assert_eq!(Storage::last_index(&store), Ok(2));
    assert_eq!(store.hard_state().unwrap(), hard_state(1, 1, 2));
}

/// A tiny deterministic generator for "random" bytes.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

#[test]
fn random_bytes_are_an_error_never_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    for (i, len) in [1usize, 100, 4096, 65_536, 1 << 20].into_iter().enumerate() {
        let path = dir.path().join(format!("garbage{i}.redb"));
        let bytes = noise(len, 0x9e37_79b9_7f4a_7c15 + i as u64);
        std::fs::write(&path, &bytes).unwrap();
        let res = Store::open(&path);
        assert!(res.is_err(), "{len} random bytes opened as a store");
        // And the file was left as it was.
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "{len} bytes: file changed"
        );
    }
}

#[test]
fn a_database_overwritten_with_random_bytes_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let store = open(&path);
        store.bootstrap(&bootstrapped_state(), &[1]).unwrap();
    }
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    std::fs::write(&path, noise(len, 42)).unwrap();
    match Store::open(&path) {
        Err(StoreError::Open { .. }) => {}
        Err(other) => panic!("expected an open error, got {other}"),
        Ok(store) => panic!(
            "a garbage file opened as a store (applied {:?})",
            store.applied()
        ),
    }
}

#[test]
fn a_damaged_header_is_an_error() {
    // Overwrite only the first page (redb's header and commit slots).
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let store = open(&path);
        store.bootstrap(&bootstrapped_state(), &[1]).unwrap();
    }
    let mut bytes = std::fs::read(&path).unwrap();
    let garbage = noise(4096.min(bytes.len()), 7);
    bytes[..garbage.len()].copy_from_slice(&garbage);
    std::fs::write(&path, &bytes).unwrap();
    assert!(Store::open(&path).is_err());
}

#[test]
fn corrupt_values_are_errors_not_panics() {
    // Values that redb stores fine but that do not decode: the store must say so.
    const LOG: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("raft_log");
    const RAFT: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("raft_meta");
    const STATE: redb::TableDefinition<(&str, &[u8]), &[u8]> = redb::TableDefinition::new("state");
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let store = open(&path);
        store.bootstrap(&bootstrapped_state(), &[1]).unwrap();
        store
            .write(WriteBatch {
                entries: vec![new_entry(2, 1), new_entry(3, 1), new_entry(4, 1)],
                ..Default::default()
            })
            .unwrap();
    }
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut log = txn.open_table(LOG).unwrap();
            // Garbage protobuf, and a valid entry under the wrong key.
            log.insert(3, [0xffu8; 7].as_slice()).unwrap();
            log.insert(4, new_entry(9, 1).write_to_bytes().unwrap().as_slice())
                .unwrap();
            let mut raft = txn.open_table(RAFT).unwrap();
            raft.insert("hard_state", [0xffu8; 5].as_slice()).unwrap();
            raft.insert("conf_state", [0xffu8; 5].as_slice()).unwrap();
            raft.insert("applied", [1u8, 2, 3].as_slice()).unwrap();
            raft.insert("node", [9u8, 9].as_slice()).unwrap();
            let mut state = txn.open_table(STATE).unwrap();
            state
                .insert(("vms_v9", [1u8].as_slice()), [1u8].as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let store = open(&path);
    assert_eq!(store.term(2), Ok(1));
    assert!(store.term(3).is_err());
    assert!(store.term(4).is_err());
    assert!(store.entries(2, 4, NO_LIMIT, ctx()).is_err());
    assert!(store.entries(4, 5, NO_LIMIT, ctx()).is_err());
    assert!(store.hard_state().is_err());
    assert!(store.conf_state().is_err());
    assert!(store.initial_state().is_err());
    assert!(store.applied().is_err());
    assert!(store.load_state().is_err());
    assert!(store.node_record().is_err());
    assert!(store.snapshot(0, 1).is_err());
    assert!(store.compact(2).is_err());
    assert!(store.bootstrap(&bootstrapped_state(), &[1]).is_err());
}

#[test]
fn a_corrupt_log_start_is_an_error_on_open() {
    const RAFT: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("raft_meta");
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    drop(open(&path));
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(RAFT)
            .unwrap()
            .insert("log_start", [1u8; 3].as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    assert!(matches!(
        Store::open(&path),
        Err(StoreError::Corrupt { .. })
    ));
}

#[test]
fn opening_the_same_file_twice_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let first = open(&path);
    match Store::open(&path) {
        Err(StoreError::Locked { path: p }) => assert_eq!(p, path),
        Err(other) => panic!("expected Locked, got {other}"),
        Ok(_) => panic!("opened the same database twice"),
    }
    assert!(matches!(
        Store::open_volatile(&path),
        Err(StoreError::Locked { .. })
    ));
    // A clone shares the handle; it is not a second open.
    let clone = first.clone();
    drop(first);
    assert!(matches!(Store::open(&path), Err(StoreError::Locked { .. })));
    drop(clone);
    open(&path);
}

// ---------------------------------------------------------------------------------------
// Bootstrap
// ---------------------------------------------------------------------------------------

#[test]
fn bootstrap_writes_the_first_snapshot() {
    let (_dir, store) = new_store();
    let state = bootstrapped_state();
    store.bootstrap(&state, &[1, 2, 3]).unwrap();
    assert_eq!(store.applied().unwrap(), (1, 1));
    let hs = store.hard_state().unwrap();
    assert_eq!((hs.term, hs.vote, hs.commit), (1, 0, 1));
    assert_eq!(store.conf_state().unwrap(), conf(&[1, 2, 3], &[]));
    assert_eq!(Storage::first_index(&store), Ok(2));
    assert_eq!(Storage::last_index(&store), Ok(1));
    assert_eq!(store.term(1), Ok(1));
    let (loaded, applied, term) = store.load_state().unwrap();
    assert_eq!((applied, term), (1, 1));
    assert_eq!(loaded.digest(), state.digest());
    assert!(loaded.cluster().is_some());
    let snap = store.snapshot(0, 2).unwrap();
    assert_eq!(snap.get_metadata().index, 1);
    assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2, 3]);
}

#[test]
fn bootstrap_refuses_a_store_that_holds_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let state = bootstrapped_state();
    let store = open(&path);
    store.bootstrap(&state, &[1]).unwrap();
    // Once more, with another state and configuration.
    let mut other = State::new();
    other
        .apply(&Command::Bootstrap {
            cluster_id: ClusterId([9; 16]),
            name: "other".into(),
            member: member(9),
            admin: EndpointKey([9; 32]),
            now_ms: 5,
        })
        .unwrap();
    assert!(matches!(
        store.bootstrap(&other, &[9]),
        Err(StoreError::Corrupt {
            what: "bootstrap",
            ..
        })
    ));
    // After a restart too.
    drop(store);
    let store = open(&path);
    assert!(store.bootstrap(&other, &[9]).is_err());
    // Nothing changed.
    let (loaded, applied, _) = store.load_state().unwrap();
    assert_eq!(applied, 1);
    assert_eq!(loaded.digest(), state.digest());
    assert_eq!(loaded.cluster().unwrap().cluster_id, ClusterId([7; 16]));
    assert_eq!(store.conf_state().unwrap().voters, vec![1]);
}

#[test]
fn bootstrap_refuses_a_store_with_a_log_or_state() {
    // A log but nothing applied: a node that joined and received entries.
    let (_dir, store) = new_store();
    store
        .write(WriteBatch {
            entries: vec![new_entry(1, 1), new_entry(2, 1)],
            hard_state: Some(hard_state(1, 0, 0)),
            ..Default::default()
        })
        .unwrap();
    assert!(store.bootstrap(&bootstrapped_state(), &[1]).is_err());
    assert_eq!(Storage::last_index(&store), Ok(2));

    // State rows holding a cluster, without an applied index.
    let (_dir, store) = new_store();
    store
        .write(WriteBatch {
            rows: bootstrapped_state().all_rows(),
            ..Default::default()
        })
        .unwrap();
    assert!(store.bootstrap(&bootstrapped_state(), &[1]).is_err());

    // Something applied (a snapshot from a leader).
    let (_dir, store) = new_store();
    store
        .apply_snapshot(&snapshot_of(&State::new(), 5, 2, &[1, 2]))
        .unwrap();
    assert!(store.bootstrap(&bootstrapped_state(), &[1]).is_err());
}

#[test]
fn the_open_check_names_what_does_not_hold_together() {
    const LOG: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("raft_log");
    const RAFT: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("raft_meta");
    let dir = tempfile::tempdir().unwrap();
    let good = db_path(&dir);
    {
        let store = open(&good);
        store.bootstrap(&bootstrapped_state(), &[1]).unwrap();
        let hs = HardState {
            term: 2,
            commit: 3,
            ..Default::default()
        };
        store
            .write(WriteBatch {
                entries: vec![new_entry(2, 1), new_entry(3, 2), new_entry(4, 2)],
                hard_state: Some(hs),
                ..Default::default()
            })
            .unwrap();
        let report = store.check().unwrap();
        assert_eq!((report.first_index, report.last_index), (1, 4));
        assert_eq!((report.term, report.commit, report.applied), (2, 3, 1));
        assert_eq!(report.entries, 3);
        assert_eq!(report.voters, vec![1]);
    }
    // Each damage on a copy of the good file, and what the check must say.
    let hs = |term: u64, commit: u64| {
        HardState {
            term,
            commit,
            ..Default::default()
        }
        .write_to_bytes()
        .unwrap()
    };
    type Damage = Box<dyn Fn(&redb::WriteTransaction)>;
    let cases: Vec<(Damage, &str)> = vec![
        (
            Box::new(move |t| {
                t.open_table(RAFT)
                    .unwrap()
                    .insert(
                        "hard_state",
                        seal(Slot::Meta("hard_state"), &hs(2, 9)).as_slice(),
                    )
                    .unwrap();
            }),
            "commit index 9 is outside the log",
        ),
        (
            Box::new(|t| {
                t.open_table(LOG).unwrap().remove(3).unwrap();
            }),
            "gap",
        ),
        (
            Box::new(move |t| {
                t.open_table(RAFT)
                    .unwrap()
                    .insert(
                        "hard_state",
                        seal(Slot::Meta("hard_state"), &hs(1, 3)).as_slice(),
                    )
                    .unwrap();
            }),
            "above the hard state's term 1",
        ),
        (
            Box::new(|t| {
                let e = seal(Slot::Log(4), &new_entry(7, 2).write_to_bytes().unwrap());
                t.open_table(LOG).unwrap().insert(4, e.as_slice()).unwrap();
            }),
            "stored at 4 says index 7",
        ),
        (
            Box::new(|t| {
                let mut pair = [0u8; 16];
                pair[..8].copy_from_slice(&4u64.to_be_bytes());
                pair[8..].copy_from_slice(&2u64.to_be_bytes());
                t.open_table(RAFT)
                    .unwrap()
                    .insert("applied", seal(Slot::Meta("applied"), &pair).as_slice())
                    .unwrap();
            }),
            "applied index 4 is outside",
        ),
        (
            Box::new(|t| {
                t.open_table(RAFT)
                    .unwrap()
                    .insert("hard_stat", [1u8].as_slice())
                    .unwrap();
            }),
            "unknown key",
        ),
    ];
    for (i, (damage, says)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("copy{i}.redb"));
        std::fs::copy(&good, &path).unwrap();
        {
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            damage(&txn);
            txn.commit().unwrap();
        }
        let err = open(&path).check().unwrap_err().to_string();
        assert!(err.contains(says), "case {i}: {err}");
    }
}

#[test]
fn a_file_written_before_checksums_is_upgraded_in_place() {
    use redb::{ReadableDatabase as _, ReadableTable as _};
    const LOG: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("raft_log");
    const RAFT: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("raft_meta");
    const STATE: redb::TableDefinition<(&str, &[u8]), &[u8]> = redb::TableDefinition::new("state");
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let before = {
        let store = open(&path);
        store.bootstrap(&bootstrapped_state(), &[1]).unwrap();
        store
            .write(WriteBatch {
                entries: vec![new_entry(2, 1), new_entry(3, 1)],
                hard_state: Some(HardState {
                    term: 1,
                    commit: 3,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .unwrap();
        store.check().unwrap()
    };
    // Strip every checksum and the format mark: the file as an older blixard wrote it.
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut raft = txn.open_table(RAFT).unwrap();
            raft.remove("format").unwrap();
            let metas: Vec<(String, Vec<u8>)> = raft
                .iter()
                .unwrap()
                .map(|r| {
                    let (k, v) = r.unwrap();
                    (k.value().to_string(), v.value()[8..].to_vec())
                })
                .collect();
            for (k, v) in metas {
                raft.insert(k.as_str(), v.as_slice()).unwrap();
            }
            let mut log = txn.open_table(LOG).unwrap();
            let entries: Vec<(u64, Vec<u8>)> = log
                .iter()
                .unwrap()
                .map(|r| {
                    let (k, v) = r.unwrap();
                    (k.value(), v.value()[8..].to_vec())
                })
                .collect();
            for (k, v) in entries {
                log.insert(k, v.as_slice()).unwrap();
            }
            let mut state = txn.open_table(STATE).unwrap();
            let rows: Vec<(String, Vec<u8>, Vec<u8>)> = state
                .iter()
                .unwrap()
                .map(|r| {
                    let (k, v) = r.unwrap();
                    let (t, key) = k.value();
                    (t.to_string(), key.to_vec(), v.value()[8..].to_vec())
                })
                .collect();
            for (t, key, v) in rows {
                state
                    .insert((t.as_str(), key.as_slice()), v.as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let unmigrated_hard_state = {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let raft = txn.open_table(RAFT).unwrap();
        raft.get("hard_state").unwrap().unwrap().value().to_vec()
    };
    let store = open(&path);
    assert_eq!(store.check().unwrap(), before);
    assert_eq!(store.term(3), Ok(1));
    drop(store);
    // The file as it was is kept beside it: unmarked, its values bare.
    let mut copy = path.as_os_str().to_owned();
    copy.push(".format-1");
    {
        let db = redb::Database::create(&copy).unwrap();
        let txn = db.begin_read().unwrap();
        let raft = txn.open_table(RAFT).unwrap();
        assert!(raft.get("format").unwrap().is_none());
        let hard_state = raft.get("hard_state").unwrap().unwrap().value().to_vec();
        assert_eq!(hard_state, unmigrated_hard_state);
    }
    // Upgraded once: the next open reads checksummed values as they are.
    assert_eq!(open(&path).check().unwrap(), before);
}

#[test]
fn a_file_of_a_newer_format_is_refused_naming_both_formats() {
    const RAFT: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("raft_meta");
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    open(&path).bootstrap(&bootstrapped_state(), &[1]).unwrap();
    let newer = blixard_store::DATA_FORMAT + 1;
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(RAFT)
            .unwrap()
            .insert("format", seal(Slot::Meta("format"), &[newer]).as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let refused = || match Store::open(&path) {
        Ok(_) => panic!("a newer format opens"),
        Err(e) => e.to_string(),
    };
    let err = refused();
    assert!(
        err.contains(&format!("has format {newer}, written by a newer blixard"))
            && err.contains(&format!(
                "reads formats 1 to {}",
                blixard_store::DATA_FORMAT
            )),
        "{err}"
    );
    // Nothing was migrated or marked: it is refused the same way again.
    assert_eq!(refused(), err);
}
