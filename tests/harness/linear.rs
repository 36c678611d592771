//! A linearizability checker for histories of registers: the Wing & Gong search with
//! Lowe's memo of (linearized set, state), as Porcupine does it, one key at a time (a
//! history of independent registers is linearizable iff each key's history is).
//!
//! Every key starts absent. A write whose outcome the client never learned (an error or
//! a timeout) may have taken effect at any time after its call, or never: its return is
//! at infinity. Such a write that no read observed is left out, which changes nothing:
//! it can always be linearized after everything else.

use std::collections::{HashMap, HashSet};
use std::fmt;

/// One operation on one key, as a client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub key: String,
    pub kind: Kind,
    /// When the client sent it, in nanoseconds from the history's start.
    pub call: u64,
    /// When the answer arrived; `None` when the outcome is unknown (writes only).
    pub ret: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Write(String),
    /// What the read returned (`None`: the key was absent).
    Read(Option<String>),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ret = self
            .ret
            .map_or("?".to_string(), |r| format!("{:.3}", r as f64 / 1e9));
        let when = format!("[{:.3}s, {ret}s]", self.call as f64 / 1e9);
        match &self.kind {
            Kind::Write(v) => write!(f, "write {}={v} {when}", self.key),
            Kind::Read(v) => write!(f, "read {}→{v:?} {when}", self.key),
        }
    }
}

/// What the checker found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order explains the history; the text says where the search got stuck.
    Violation(String),
    /// The search gave up after its step budget.
    Undecided(String),
}

/// The default step budget per key: far beyond what the suite's histories need.
pub const BUDGET: u64 = 50_000_000;

/// Checks every key's history.
pub fn check(ops: &[Op]) -> Verdict {
    check_with_budget(ops, BUDGET)
}

pub fn check_with_budget(ops: &[Op], budget: u64) -> Verdict {
    let mut by_key: HashMap<&str, Vec<&Op>> = HashMap::new();
    for op in ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let mut keys: Vec<&str> = by_key.keys().copied().collect();
    keys.sort_unstable();
    for key in keys {
        match check_key(&by_key[key], budget) {
            Verdict::Linearizable => {}
            other => return other,
        }
    }
    Verdict::Linearizable
}

/// A set of operation indexes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// One key's history.
fn check_key(all: &[&Op], budget: u64) -> Verdict {
    let read: HashSet<&str> = all
        .iter()
        .filter_map(|o| match &o.kind {
            Kind::Read(Some(v)) => Some(v.as_str()),
            _ => None,
        })
        .collect();
    // Unknown writes nobody read, and reads without an answer, change nothing.
    let ops: Vec<&Op> = all
        .iter()
        .copied()
        .filter(|o| match &o.kind {
            Kind::Write(v) => o.ret.is_some() || read.contains(v.as_str()),
            Kind::Read(_) => o.ret.is_some(),
        })
        .collect();
    let n = ops.len();
    if n == 0 {
        return Verdict::Linearizable;
    }
    // Values as numbers; 0 is "absent".
    let mut ids: HashMap<&str, u32> = HashMap::new();
    for o in &ops {
        if let Kind::Write(v) = &o.kind {
            let next = ids.len() as u32 + 1;
            ids.entry(v.as_str()).or_insert(next);
        }
    }
    // (is a write, the value written or read)
    let mut steps_of = Vec::with_capacity(n);
    for o in &ops {
        let step = match &o.kind {
            Kind::Write(v) => (true, ids[v.as_str()]),
            Kind::Read(None) => (false, 0),
            Kind::Read(Some(v)) => match ids.get(v.as_str()) {
                Some(id) => (false, *id),
                None => {
                    return Verdict::Violation(format!(
                        "{o}: the value was never written by anyone"
                    ))
                }
            },
        };
        steps_of.push(step);
    }

    // Events in time order, calls before returns at equal times; unknown returns last.
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, o) in ops.iter().enumerate() {
        events.push((o.call, false, i));
        events.push((o.ret.unwrap_or(u64::MAX), true, i));
    }
    events.sort_unstable();
    let m = events.len();
    let head = m;
    let nil = usize::MAX;
    let mut next = vec![nil; m + 1];
    let mut prev = vec![nil; m + 1];
    let mut ret_of = vec![0; n];
    let mut last = head;
    for (e, &(_, is_ret, op)) in events.iter().enumerate() {
        next[last] = e;
        prev[e] = last;
        last = e;
        if is_ret {
            ret_of[op] = e;
        }
    }
    let unlink = |x: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, q) = (prev[x], next[x]);
        next[p] = q;
        if q != nil {
            prev[q] = p;
        }
    };
    let relink = |x: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, q) = (prev[x], next[x]);
        next[p] = x;
        if q != nil {
            prev[q] = x;
        }
    };

    let mut state = 0u32;
    let mut linearized = Bits::new(n);
    let mut stack: Vec<(usize, u32)> = Vec::new();
    let mut seen: HashSet<(Bits, u32)> = HashSet::new();
    let mut entry = next[head];
    let mut steps = 0u64;
    let mut deepest = (0usize, 0usize);
    while next[head] != nil {
        steps += 1;
        if steps > budget {
            return Verdict::Undecided(format!(
                "key {}: {n} operations, gave up after {budget} steps",
                ops[0].key
            ));
        }
        if entry == nil {
            // Cannot happen: every remaining call is followed by its return.
            return Verdict::Undecided("the search ran off the end of the history".into());
        }
        let (_, is_ret, op) = events[entry];
        if !is_ret {
            let (write, v) = steps_of[op];
            let legal = write || state == v;
            if legal {
                let new_state = if write { v } else { state };
                linearized.set(op);
                if seen.insert((linearized.clone(), new_state)) {
                    stack.push((entry, state));
                    state = new_state;
                    unlink(entry, &mut next, &mut prev);
                    unlink(ret_of[op], &mut next, &mut prev);
                    entry = next[head];
                    continue;
                }
                linearized.clear(op);
            }
            entry = next[entry];
        } else {
            // This operation had to take effect before its return, and could not.
            if stack.len() >= deepest.0 {
                deepest = (stack.len(), op);
            }
            let Some((call, previous)) = stack.pop() else {
                return Verdict::Violation(explain(&ops, deepest));
            };
            let (_, _, undone) = events[call];
            state = previous;
            linearized.clear(undone);
            relink(ret_of[undone], &mut next, &mut prev);
            relink(call, &mut next, &mut prev);
            entry = next[call];
        }
    }
    Verdict::Linearizable
}

/// Where the search got stuck: the operation that could not be placed after the longest
/// linearizable prefix, and the operations overlapping it.
fn explain(ops: &[&Op], (depth, stuck): (usize, usize)) -> String {
    let o = ops[stuck];
    let end = o.ret.unwrap_or(u64::MAX);
    let mut overlapping: Vec<String> = ops
        .iter()
        .filter(|p| p.call <= end && p.ret.unwrap_or(u64::MAX) >= o.call)
        .take(12)
        .map(|p| format!("  {p}"))
        .collect();
    overlapping.sort();
    format!(
        "key {}: not linearizable ({} operations; at most {depth} fit an order before \
         `{o}` could not); operations overlapping it:\n{}",
        o.key,
        ops.len(),
        overlapping.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::Rng;

    fn w(key: &str, v: &str, call: u64, ret: Option<u64>) -> Op {
        Op {
            key: key.into(),
            kind: Kind::Write(v.into()),
            call,
            ret,
        }
    }

    fn r(key: &str, v: Option<&str>, call: u64, ret: u64) -> Op {
        Op {
            key: key.into(),
            kind: Kind::Read(v.map(str::to_string)),
            call,
            ret: Some(ret),
        }
    }

    fn violation(ops: &[Op]) -> String {
        match check(ops) {
            Verdict::Violation(why) => why,
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    #[test]
    fn sequential_and_overlapping_histories_pass() {
        let ops = [
            r("k", None, 0, 1),
            w("k", "a", 2, Some(3)),
            r("k", Some("a"), 4, 5),
            // b and c overlap: reads may see them in either order, consistently.
            w("k", "b", 6, Some(10)),
            w("k", "c", 7, Some(11)),
            r("k", Some("c"), 8, 9),
            r("k", Some("b"), 12, 13),
        ];
        assert_eq!(check(&ops), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_after_an_acknowledged_write_is_caught() {
        let ops = [
            w("k", "a", 0, Some(1)),
            w("k", "b", 2, Some(3)),
            r("k", Some("a"), 4, 5),
        ];
        let why = violation(&ops);
        assert!(why.contains("read k→Some(\"a\")"), "{why}");
    }

    #[test]
    fn a_lost_write_is_caught() {
        // Acknowledged, then the final read finds the key absent.
        let ops = [w("k", "a", 0, Some(1)), r("k", None, 5, 6)];
        violation(&ops);
    }

    #[test]
    fn values_going_back_in_time_are_caught() {
        // Two reads, one after the other, see two overlapping writes in both orders.
        let ops = [
            w("k", "a", 0, Some(10)),
            w("k", "b", 0, Some(10)),
            r("k", Some("a"), 1, 2),
            r("k", Some("b"), 3, 4),
            r("k", Some("a"), 5, 6),
        ];
        violation(&ops);
    }

    #[test]
    fn a_read_of_a_value_nobody_wrote_is_caught() {
        let why = violation(&[w("k", "a", 0, Some(1)), r("k", Some("z"), 2, 3)]);
        assert!(why.contains("never written"), "{why}");
    }

    #[test]
    fn unknown_writes_may_apply_late_or_never() {
        let ops = [
            // Timed out; observed much later: it applied late.
            w("k", "a", 0, None),
            r("k", None, 5, 6),
            r("k", Some("a"), 20, 21),
            // Timed out and never observed: it may not have applied.
            w("j", "x", 0, None),
            r("j", None, 30, 31),
        ];
        assert_eq!(check(&ops), Verdict::Linearizable);
        // But an unknown write cannot apply before it was sent.
        let ops = [r("k", Some("a"), 0, 1), w("k", "a", 5, None)];
        violation(&ops);
    }

    #[test]
    fn keys_are_independent() {
        let ops = [
            w("a", "1", 0, Some(1)),
            w("b", "2", 2, Some(3)),
            r("a", Some("1"), 4, 5),
            r("b", None, 6, 7),
        ];
        let why = violation(&ops);
        assert!(why.starts_with("key b"), "{why}");
    }

    /// Random histories of a real atomic register (each operation takes effect at one
    /// instant inside its interval) pass; changing one read's answer makes them fail
    /// (except where another moment of that read's interval allows the new answer).
    #[test]
    fn random_atomic_histories_pass_and_corrupted_ones_fail() {
        let mut rng = Rng::new(7);
        let mut caught = 0;
        for round in 0..200 {
            let clients = 1 + rng.below(6) as usize;
            let mut ops = Vec::new();
            // (effect time, op index)
            let mut effects: Vec<(u64, usize)> = Vec::new();
            for c in 0..clients {
                let mut t = rng.below(10);
                for i in 0..(5 + rng.below(20)) {
                    let call = t;
                    let effect = call + 1 + rng.below(30);
                    let ret = effect + 1 + rng.below(30);
                    let write = rng.below(2) == 0;
                    let kind = if write {
                        Kind::Write(format!("{c}-{i}"))
                    } else {
                        Kind::Read(None)
                    };
                    effects.push((effect * 16 + c as u64, ops.len()));
                    // Some writes time out: the client never learns their outcome.
                    let ret = (!write || rng.below(10) > 0).then_some(ret);
                    ops.push(Op {
                        key: "k".into(),
                        kind,
                        call: call * 16,
                        ret: ret.map(|r| r * 16 + 15),
                    });
                    t = ret.unwrap_or(effect) + 1 + rng.below(5);
                }
            }
            // Apply in effect order to fill in the reads.
            effects.sort_unstable();
            let mut value: Option<String> = None;
            for (_, i) in &effects {
                match &mut ops[*i].kind {
                    Kind::Write(v) => value = Some(v.clone()),
                    Kind::Read(v) => *v = value.clone(),
                }
            }
            assert_eq!(check(&ops), Verdict::Linearizable, "round {round}");

            // Corrupt one read to a value written after it returned, if any.
            let reads: Vec<usize> = (0..ops.len())
                .filter(|i| matches!(ops[*i].kind, Kind::Read(_)))
                .collect();
            let Some(&victim) = reads.get(rng.below(reads.len().max(1) as u64) as usize) else {
                continue;
            };
            let done = ops[victim].ret.unwrap_or(u64::MAX);
            let future = ops.iter().find_map(|o| match &o.kind {
                Kind::Write(v) if o.call > done => Some(v.clone()),
                _ => None,
            });
            if let Some(v) = future {
                ops[victim].kind = Kind::Read(Some(v));
                violation(&ops);
                caught += 1;
            }
        }
        assert!(caught > 50, "only {caught} corrupted histories were tried");
    }

    #[test]
    fn a_long_concurrent_history_is_decided_quickly() {
        // 8 clients, 4,000 operations on one key, with timeouts: must not blow up.
        let mut rng = Rng::new(11);
        let mut ops = Vec::new();
        let mut value: Option<String> = None;
        let mut t = 0u64;
        for i in 0..4000u64 {
            // Each operation takes effect at t; its interval spans a few neighbours.
            let call = t.saturating_sub(rng.below(8 * 10));
            let ret = t + rng.below(8 * 10);
            let write = rng.below(3) > 0;
            let kind = if write {
                value = Some(format!("v{i}"));
                Kind::Write(format!("v{i}"))
            } else {
                Kind::Read(value.clone())
            };
            let ret = (!write || rng.below(50) > 0).then_some(ret);
            ops.push(Op {
                key: "k".into(),
                kind,
                call,
                ret,
            });
            t += 10;
        }
        let started = std::time::Instant::now();
        assert_eq!(check(&ops), Verdict::Linearizable);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }
}
