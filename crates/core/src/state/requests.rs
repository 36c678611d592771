//! Commands applied at most once per client request id (`Command::Once`): a retried
//! write, or a write a node proposed again after a leader change, gets the first
//! application's result and changes nothing.
//!
//! Each applied id is kept with its result for [`WINDOW_MS`] of the proposers' clocks,
//! and at most [`MAX_KEPT`] ids: retries come within a client's timeout (seconds), and
//! under a sustained rate above `MAX_KEPT / WINDOW_MS` the window is that much shorter.

use serde::{Deserialize, Serialize};

use super::{Applied, State};
use crate::command::{Command, CommandOutput};
use crate::ids::RequestId;
use crate::state::ApplyError;

/// How long an applied id is remembered, in the proposers' milliseconds.
pub const WINDOW_MS: u64 = 5 * 60 * 1000;
/// The most ids remembered at once.
pub const MAX_KEPT: usize = 100_000;

/// What applying one log entry did.
#[derive(Debug)]
pub struct Outcome {
    pub result: Applied,
    /// It repeated a request id applied before: the first result, nothing changed.
    pub repeat: bool,
}

/// The first application of a request id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// Its place in `request_order`.
    pub seq: u64,
    /// The proposer's clock when it was applied.
    pub at_ms: u64,
    pub output: CommandOutput,
}

impl State {
    /// Applies `command` unless `id` was applied before (then returns that result).
    /// Only successful applications are remembered: a refused command changed nothing,
    /// so applying it again is still applying it once.
    pub(super) fn apply_once(&mut self, id: RequestId, now_ms: u64, command: &Command) -> Outcome {
        if let Some(done) = self.requests.get(&id) {
            return Outcome {
                result: Ok(done.output.clone()),
                repeat: true,
            };
        }
        let result = self.apply_first(id, now_ms, command);
        Outcome {
            result,
            repeat: false,
        }
    }

    fn apply_first(&mut self, id: RequestId, now_ms: u64, command: &Command) -> Applied {
        if matches!(
            command,
            Command::Once { .. } | Command::Bootstrap { .. } | Command::Join(_)
        ) {
            return Err(ApplyError::NotOnce(command.kind().to_string()));
        }
        let output = self.apply(command)?;
        let seq = self.request_order.last().map_or(0, |(s, _)| s + 1);
        self.requests.insert(
            id,
            Done {
                seq,
                at_ms: now_ms,
                output: output.clone(),
            },
        );
        self.request_order.insert(seq, id);
        self.expire_requests(now_ms);
        Ok(output)
    }

    /// Forgets the oldest ids: those past the window, and any beyond `MAX_KEPT`.
    fn expire_requests(&mut self, now_ms: u64) {
        while let Some((&seq, &id)) = self.request_order.first() {
            let old = self
                .requests
                .get(&id)
                .is_none_or(|d| d.at_ms.saturating_add(WINDOW_MS) < now_ms);
            if !old && self.request_order.len() <= MAX_KEPT {
                break;
            }
            self.request_order.remove(&seq);
            self.requests.remove(&id);
        }
    }

    /// Whether a command under `id` was applied (and is still remembered).
    pub fn applied_request(&self, id: &RequestId) -> Option<&CommandOutput> {
        self.requests.get(id).map(|d| &d.output)
    }
}
