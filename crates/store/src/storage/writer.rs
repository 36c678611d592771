//! The `Store` side of asynchronous persistence (see `crate::persist`): staging entries,
//! queueing batches and compactions, and the writer that commits them in order.

use raft::eraftpb::Entry;

use super::Store;
use crate::batch::WriteBatch;
use crate::error::{corrupt, StoreError};
use crate::persist::{Job, PersistNotify, Persisted};

impl Store {
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
            let started = std::time::Instant::now();
            let result = self.execute(jobs);
            let took = started.elapsed();
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
                Ok(Some(ready)) => notify(Ok(Persisted { ready, took })),
                Ok(None) => {}
                Err(e) => {
                    notify(Err(e));
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
                        Some(m) => m.merge(*batch),
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
}
