//! What the host should do next for one VM: a pure function of what the cluster wants,
//! what this host last did for it, and what its process is doing. The daemon's reconciler
//! loop gathers the inputs, calls [`plan`], carries the action out and reports the phase.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the host does when a runner exits on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Restart {
    Always,
    OnFailure,
    Never,
}

/// What cluster state asks of this host for one VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    /// The placement this host holds (a new placement is a fresh start).
    pub generation: u64,
    pub running: bool,
    /// Restart requests so far (`vm restart` bumps it).
    pub restarts: u64,
    pub policy: Restart,
}

/// What this host last did for a VM; kept in the VM's state dir so a restarted daemon
/// carries on where it stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub generation: u64,
    /// The restart requests already carried out.
    pub restarts: u64,
    /// Exits in a row that were followed by a restart (for the backoff).
    pub failures: u32,
    /// When the runner was last started (ms since the epoch).
    pub started_at_ms: u64,
    /// When this host first saw the runner gone after that start.
    pub exited_at_ms: Option<u64>,
    /// The host stopped it because it was asked to (so it is not an exit to act on).
    pub stopped: bool,
    /// Where this run's output starts in the console log.
    #[serde(default)]
    pub console_from: u64,
}

/// What the runner's process is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    Running,
    Exited {
        code: Option<i32>,
    },
    /// Never started on this host.
    Absent,
}

/// The next step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do: it runs as it should, or stays stopped.
    Keep,
    /// Start the runner (fetching the image first if it is not here).
    Start,
    /// Stop the runner.
    Stop,
    /// Stop and start again (a restart request).
    Restart,
    /// Restart after this much more backoff.
    Wait(Duration),
    /// It exited and stays down: report it stopped (`failed: false`) or failed.
    Down { failed: bool },
}

/// The first restart waits this long; each further one in a row twice as long.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A run this long resets the backoff.
pub const STABLE_RUN: Duration = Duration::from_secs(60);

/// The backoff before restart number `failures + 1` in a row.
pub fn backoff(failures: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX))
        .min(BACKOFF_MAX)
}

/// Decides the next step for one VM at `now_ms`.
pub fn plan(want: &Want, record: Option<&Record>, observed: Observed, now_ms: u64) -> Action {
    if !want.running {
        return match observed {
            Observed::Running => Action::Stop,
            _ => Action::Keep,
        };
    }
    let Some(record) = record.filter(|r| r.generation == want.generation) else {
        // A placement this host has not acted on: adopt what runs, start what does not.
        return match observed {
            Observed::Running => Action::Keep,
            _ => Action::Start,
        };
    };
    let restart_asked = want.restarts > record.restarts;
    match observed {
        Observed::Running if restart_asked => Action::Restart,
        Observed::Running => Action::Keep,
        Observed::Absent => Action::Start,
        Observed::Exited { .. } if restart_asked || record.stopped => Action::Start,
        Observed::Exited { code } => {
            let failed = code != Some(0);
            let again = match want.policy {
                Restart::Always => true,
                Restart::OnFailure => failed,
                Restart::Never => false,
            };
            if !again {
                return Action::Down { failed };
            }
            let exited = record.exited_at_ms.unwrap_or(now_ms);
            let waited = Duration::from_millis(now_ms.saturating_sub(exited));
            let delay = backoff(record.failures);
            if waited >= delay {
                Action::Start
            } else {
                Action::Wait(delay - waited)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(policy: Restart) -> Want {
        Want {
            generation: 3,
            running: true,
            restarts: 0,
            policy,
        }
    }

    fn ran(failures: u32, exited_at_ms: u64) -> Record {
        Record {
            generation: 3,
            restarts: 0,
            failures,
            started_at_ms: 0,
            exited_at_ms: Some(exited_at_ms),
            stopped: false,
            console_from: 0,
        }
    }

    const OK: Observed = Observed::Exited { code: Some(0) };
    const CRASH: Observed = Observed::Exited { code: Some(1) };

    #[test]
    fn new_placements_start_or_adopt() {
        let w = want(Restart::Never);
        assert_eq!(plan(&w, None, Observed::Absent, 0), Action::Start);
        assert_eq!(plan(&w, None, Observed::Running, 0), Action::Keep);
        // An exit left over from an older placement is not this placement's exit.
        let old = Record {
            generation: 2,
            ..ran(0, 0)
        };
        assert_eq!(plan(&w, Some(&old), CRASH, 0), Action::Start);
    }

    #[test]
    fn exits_follow_the_restart_policy() {
        let r = ran(0, 1_000);
        assert_eq!(
            plan(&want(Restart::Never), Some(&r), CRASH, 5_000),
            Action::Down { failed: true }
        );
        assert_eq!(
            plan(&want(Restart::Never), Some(&r), OK, 5_000),
            Action::Down { failed: false }
        );
        assert_eq!(
            plan(&want(Restart::OnFailure), Some(&r), OK, 5_000),
            Action::Down { failed: false }
        );
        assert_eq!(
            plan(&want(Restart::OnFailure), Some(&r), CRASH, 5_000),
            Action::Start
        );
        assert_eq!(
            plan(&want(Restart::Always), Some(&r), OK, 5_000),
            Action::Start
        );
        // Killed by a signal (no code) counts as a failure.
        assert_eq!(
            plan(
                &want(Restart::OnFailure),
                Some(&r),
                Observed::Exited { code: None },
                5_000
            ),
            Action::Start
        );
    }

    #[test]
    fn restarts_back_off_exponentially_up_to_a_cap() {
        let w = want(Restart::Always);
        assert_eq!(
            plan(&w, Some(&ran(0, 1_000)), CRASH, 1_400),
            Action::Wait(Duration::from_millis(600))
        );
        assert_eq!(
            plan(&w, Some(&ran(3, 1_000)), CRASH, 5_000),
            Action::Wait(Duration::from_secs(4))
        );
        assert_eq!(plan(&w, Some(&ran(3, 1_000)), CRASH, 9_000), Action::Start);
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(5), Duration::from_secs(32));
        assert_eq!(backoff(6), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn requests_win_over_the_policy() {
        let mut w = want(Restart::Never);
        // A restart request restarts a running VM once, and starts an exited one.
        w.restarts = 1;
        assert_eq!(
            plan(&w, Some(&ran(0, 0)), Observed::Running, 0),
            Action::Restart
        );
        assert_eq!(plan(&w, Some(&ran(0, 0)), CRASH, 0), Action::Start);
        let done = Record {
            restarts: 1,
            ..ran(0, 0)
        };
        assert_eq!(plan(&w, Some(&done), Observed::Running, 0), Action::Keep);
        // Stop means stop, whatever the policy; start after a stop starts.
        let mut stop = want(Restart::Always);
        stop.running = false;
        assert_eq!(plan(&stop, Some(&done), Observed::Running, 0), Action::Stop);
        assert_eq!(plan(&stop, Some(&done), OK, 0), Action::Keep);
        let stopped = Record {
            stopped: true,
            ..ran(0, 0)
        };
        assert_eq!(
            plan(&want(Restart::Never), Some(&stopped), OK, 0),
            Action::Start
        );
    }
}
