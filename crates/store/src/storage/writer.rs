//! The `Store` side of asynchronous persistence (see `crate::persist`): staging entries,
//! queueing batches and compactions, and the writer that commits them in order.

use std::time::Instant;

use raft::eraftpb::Entry;

use super::Store;
use crate::batch::WriteBatch;
use crate::error::{corrupt, StoreError};
use crate::persist::{Carried, Job, PersistNotify, Persisted, CARRY_FOR};

/// What one run of the writer did.
#[derive(Default)]
struct Executed {
    /// The highest `Ready` number written or held.
    top: Option<u64>,
    /// The batch handed back to be held.
    carry: Option<WriteBatch>,
    /// Whether anything reached the database.
    wrote: bool,
}

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
            let (jobs, carried, may_carry) = {
                let mut q = queue.lock();
                while q.jobs.is_empty() {
                    match q.carried.as_ref().map(|c| c.since.elapsed()) {
                        Some(_) if q.carry_due() => break,
                        Some(held) => q = queue.wait_for(q, CARRY_FOR.saturating_sub(held)),
                        None if q.stop => return,
                        None => q = queue.wait(q),
                    }
                }
                q.busy = true;
                let may_carry = !q.carry_due();
                let carried = q.carried.take();
                (q.jobs.drain(..).collect::<Vec<_>>(), carried, may_carry)
            };
            let since = carried.as_ref().map(|c| c.since);
            let started = Instant::now();
            let result = self.execute(carried.map(|c| c.batch), jobs, may_carry);
            let took = started.elapsed();
            let report = {
                let mut q = queue.lock();
                q.busy = false;
                match result {
                    Ok(done) => {
                        if let Some(batch) = done.carry {
                            q.carried = Some(Carried {
                                batch,
                                since: since.unwrap_or(started),
                            });
                        }
                        done.top.map(|ready| {
                            Ok(Persisted {
                                ready,
                                took: done.wrote.then_some(took),
                            })
                        })
                    }
                    Err(e) => {
                        q.failed = Some(e.to_string());
                        q.jobs.clear();
                        q.carried = None;
                        Some(Err(e))
                    }
                }
            };
            queue.changed.notify_all();
            match report {
                Some(Ok(done)) => notify(Ok(done)),
                Some(Err(e)) => {
                    notify(Err(e));
                    return;
                }
                None => {}
            }
        }
    }

    /// Writes `carried` and then `jobs` in order, consecutive batches in one transaction.
    /// With `may_carry`, a last batch that need not be synced is handed back unwritten
    /// instead (to be held for the next one, see `CARRY_FOR`).
    fn execute(
        &self,
        carried: Option<WriteBatch>,
        jobs: Vec<Job>,
        may_carry: bool,
    ) -> Result<Executed, StoreError> {
        let mut merged = carried;
        let mut done = Executed::default();
        for job in jobs {
            match job {
                Job::Write { batch, ready } => {
                    match merged.as_mut() {
                        Some(m) => m.merge(*batch),
                        None => merged = Some(*batch),
                    }
                    done.top = Some(ready);
                }
                Job::Compact(index) => {
                    if let Some(m) = merged.take() {
                        done.wrote |= !m.is_empty();
                        self.write(m)?;
                    }
                    self.compact(index)?;
                    done.wrote = true;
                }
            }
        }
        match merged {
            Some(m) if may_carry && !m.sync && !m.is_empty() => done.carry = Some(m),
            Some(m) => {
                done.wrote |= !m.is_empty();
                self.write(m)?;
            }
            None => {}
        }
        Ok(done)
    }

    /// Without a writer thread: runs up to `max` queued jobs here and returns the highest
    /// `Ready` number written (simulations decide when writes happen; nothing is held).
    pub fn run_queued(&self, max: usize) -> Result<Option<u64>, StoreError> {
        let jobs: Vec<Job> = {
            let mut q = self.inner.queue.lock();
            if let Some(e) = &q.failed {
                return Err(corrupt("queued write", e));
            }
            let n = max.min(q.jobs.len());
            q.jobs.drain(..n).collect()
        };
        Ok(self.execute(None, jobs, false)?.top)
    }

    /// Waits until every queued job is written, a held batch included (or runs them,
    /// without a writer thread). Returns the highest `Ready` number this wrote, if it ran
    /// them itself.
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
            if q.jobs.is_empty() && !q.busy && q.carried.is_none() {
                q.draining = false;
                return Ok(None);
            }
            if !q.draining {
                q.draining = true;
                queue.changed.notify_all();
            }
            q = queue.wait(q);
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
