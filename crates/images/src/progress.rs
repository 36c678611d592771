//! Progress of long operations (import, fetch), reported to whoever watches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One progress report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgressEvent {
    /// What is happening ("importing", "fetching").
    pub phase: &'static str,
    pub done: u64,
    pub total: u64,
}

type Sink = Arc<dyn Fn(&ProgressEvent) + Send + Sync>;

/// Counts bytes done against a total and tells a sink; cheap to clone and share between
/// tasks. [`Progress::none`] reports to nobody.
#[derive(Clone, Default)]
pub struct Progress {
    phase: Arc<std::sync::Mutex<&'static str>>,
    done: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    sink: Option<Sink>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("done", &self.done.load(Ordering::Relaxed))
            .field("total", &self.total.load(Ordering::Relaxed))
            .finish()
    }
}

impl Progress {
    pub fn none() -> Self {
        Self::default()
    }

    pub fn new(sink: impl Fn(&ProgressEvent) + Send + Sync + 'static) -> Self {
        Self {
            sink: Some(Arc::new(sink)),
            ..Self::default()
        }
    }

    pub fn start(&self, phase: &'static str, total: u64) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase;
        }
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.report();
    }

    pub fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
        self.report();
    }

    pub fn finish(&self) {
        self.done
            .store(self.total.load(Ordering::Relaxed), Ordering::Relaxed);
        self.report();
    }

    fn report(&self) {
        if let Some(sink) = &self.sink {
            let phase = self.phase.lock().map(|p| *p).unwrap_or("working");
            sink(&ProgressEvent {
                phase,
                done: self.done.load(Ordering::Relaxed),
                total: self.total.load(Ordering::Relaxed),
            });
        }
    }
}
