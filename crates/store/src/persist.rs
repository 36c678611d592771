//! Asynchronous persistence: the raft thread queues its writes and goes on; one writer
//! commits them in order, many at a time, and reports which `Ready` numbers are durable.
//!
//! Raft-rs may only read entries it handed over for persisting from storage before they
//! are durable, so appended entries go into an in-memory tail first ([`Tail`]), which the
//! `raft::Storage` reads consult before the database. The tail always holds every entry
//! not yet written (and a window of recent written ones, which serves replication and
//! apply without a database read).

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use raft::eraftpb::Entry;

use crate::batch::WriteBatch;
use crate::error::StoreError;

/// How long the writer may hold a batch that need not be synced (a commit index, applied
/// rows) for the next one, so that both go in one transaction: at one writer the applied
/// rows of write N then ride in the transaction that appends write N+1 instead of making
/// one of their own. Held or written, such a batch is lost in a crash alike (redb's
/// non-durable commits are), and recovered from the log.
pub(crate) const CARRY_FOR: Duration = Duration::from_millis(10);

/// Written entries kept in the tail beyond the ones still queued.
pub(crate) const TAIL_KEEP: usize = 1024;

/// The newest entries of the log, contiguous by index, the last one being the log's last.
#[derive(Default)]
pub(crate) struct Tail {
    entries: VecDeque<Entry>,
}

impl Tail {
    pub(crate) fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.index)
    }

    pub(crate) fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|e| e.index)
    }

    pub(crate) fn get(&self, index: u64) -> Option<&Entry> {
        let first = self.first_index()?;
        let pos = usize::try_from(index.checked_sub(first)?).ok()?;
        self.entries.get(pos)
    }

    /// Appends entries, replacing any conflicting (same or higher index) ones.
    pub(crate) fn append(&mut self, new: &[Entry]) {
        let Some(first) = new.first().map(|e| e.index) else {
            return;
        };
        while self.entries.back().is_some_and(|e| e.index >= first) {
            self.entries.pop_back();
        }
        if self.last_index().is_some_and(|last| last + 1 != first) {
            // Not contiguous (cannot happen through raft): start over from the new ones.
            self.entries.clear();
        }
        self.entries.extend(new.iter().cloned());
    }

    /// Drops written entries up to `(index, term)` beyond the window; only when the tail
    /// holds that very entry (a later conflicting append may have replaced it).
    pub(crate) fn written(&mut self, index: u64, term: u64) {
        if self.get(index).map(|e| e.term) != Some(term) {
            return;
        }
        while self.entries.len() > TAIL_KEEP
            && self.entries.front().is_some_and(|e| e.index <= index)
        {
            self.entries.pop_front();
        }
    }

    /// Drops entries up to `index` (compacted away).
    pub(crate) fn compacted(&mut self, index: u64) {
        while self.entries.front().is_some_and(|e| e.index <= index) {
            self.entries.pop_front();
        }
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }
}

/// Told, from the writer thread, the highest `Ready` number that is now durable, or the
/// error that stopped the writer.
pub type PersistNotify = Box<dyn Fn(Result<Persisted, StoreError>) + Send>;

/// One group of queued writes made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Persisted {
    /// The highest `Ready` number now durable.
    pub ready: u64,
    /// How long writing the group took, its fsync included; `None` when nothing had to
    /// be written (the group was held for the next one, see `CARRY_FOR`).
    pub took: Option<Duration>,
}

/// One queued write.
#[derive(Debug)]
pub(crate) enum Job {
    /// A batch and the number of the `Ready` it persists.
    Write { batch: Box<WriteBatch>, ready: u64 },
    /// Compact the log up to this index (which earlier jobs applied).
    Compact(u64),
}

#[derive(Default)]
pub(crate) struct QueueState {
    pub(crate) jobs: VecDeque<Job>,
    /// A writer thread runs the jobs (otherwise the owner runs them: [`crate::Store::run_queued`]).
    pub(crate) background: bool,
    /// The writer took jobs and has not finished them.
    pub(crate) busy: bool,
    pub(crate) stop: bool,
    /// The first write that failed; nothing is written after it.
    pub(crate) failed: Option<String>,
    /// A batch that need not be synced, reported and held for the next one.
    pub(crate) carried: Option<Carried>,
    /// Someone waits for everything to be written: write the carried batch now.
    pub(crate) draining: bool,
}

impl QueueState {
    /// Whether the held batch, if any, must be written now rather than wait for the next
    /// one: the writer stops, someone flushes, or it was held `CARRY_FOR` already.
    pub(crate) fn carry_due(&self) -> bool {
        self.stop
            || self.draining
            || self
                .carried
                .as_ref()
                .is_some_and(|c| c.since.elapsed() >= CARRY_FOR)
    }
}

/// A batch the writer holds (see `CARRY_FOR`), and since when.
pub(crate) struct Carried {
    pub(crate) batch: WriteBatch,
    pub(crate) since: Instant,
}

#[derive(Default)]
pub(crate) struct Queue {
    pub(crate) state: Mutex<QueueState>,
    pub(crate) changed: Condvar,
}

impl Queue {
    pub(crate) fn lock(&self) -> MutexGuard<'_, QueueState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Waits until the queue changes.
    pub(crate) fn wait<'a>(&self, q: MutexGuard<'a, QueueState>) -> MutexGuard<'a, QueueState> {
        match self.changed.wait(q) {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Waits until the queue changes, or `at_most`.
    pub(crate) fn wait_for<'a>(
        &self,
        q: MutexGuard<'a, QueueState>,
        at_most: Duration,
    ) -> MutexGuard<'a, QueueState> {
        match self.changed.wait_timeout(q, at_most) {
            Ok((g, _)) => g,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    pub(crate) fn push(&self, job: Job) {
        self.lock().jobs.push_back(job);
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    fn indexes(t: &Tail) -> Vec<(u64, u64)> {
        t.entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn tail_appends_and_replaces_conflicting_entries() {
        let mut t = Tail::default();
        t.append(&[entry(5, 1), entry(6, 1), entry(7, 1)]);
        t.append(&[entry(6, 2)]);
        assert_eq!(indexes(&t), vec![(5, 1), (6, 2)]);
        // A conflict below the tail's start replaces all of it.
        t.append(&[entry(3, 3), entry(4, 3)]);
        assert_eq!(indexes(&t), vec![(3, 3), (4, 3)]);
        assert_eq!(t.get(4).map(|e| e.term), Some(3));
        assert!(t.get(2).is_none() && t.get(5).is_none());
    }

    #[test]
    fn tail_drops_written_entries_only_beyond_the_window_and_only_if_still_current() {
        let mut t = Tail::default();
        let n = TAIL_KEEP as u64 + 10;
        t.append(&(1..=n).map(|i| entry(i, 1)).collect::<Vec<_>>());
        // A write of an entry the tail no longer holds (other term) drops nothing.
        t.written(20, 2);
        assert_eq!(t.first_index(), Some(1));
        t.written(5, 1);
        assert_eq!(t.first_index(), Some(6));
        t.written(n, 1);
        assert_eq!(t.entries.len(), TAIL_KEEP);
        assert_eq!(t.last_index(), Some(n));
        t.compacted(n - 1);
        assert_eq!(indexes(&t), vec![(n, 1)]);
    }
}
