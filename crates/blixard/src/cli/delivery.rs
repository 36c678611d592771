//! `blixard image pull NAME --to n2,n3 | --all`: delivering an image to several nodes.
//!
//! A node pulls from every node that holds the image complete when it starts, so the
//! CLI starts one new puller per holder and no more: each holder serves about one puller
//! at a time, every finished puller becomes a holder, and the number of holders doubles
//! each round. Delivery to N nodes from one holder then takes about log2(N + 1) transfers,
//! where N pullers started at once would share one holder's CPU and uplink.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use blixard_core::{MemberStatus, NodeId};
use blixard_net::api::{ImagePull, ImagePulled, ImageShow, NodeEntry, NodeList, PHASE_HELD};
use blixard_net::client::ApiClient;
use iroh::EndpointAddr;
use serde::Serialize;
use tokio::task::JoinSet;

use super::format::{self as output, count, human_bytes, Format};
use super::{client, Context};
use blixard_node::exit::{self, Failure};

/// Which nodes pull next.
#[derive(Debug)]
pub struct Waves {
    pending: VecDeque<NodeId>,
    holders: usize,
    running: usize,
    /// Pulls that reported their node a holder before they ended (it is unpacking).
    held: BTreeSet<NodeId>,
}

impl Waves {
    pub fn new(holders: usize, targets: impl IntoIterator<Item = NodeId>) -> Self {
        Self {
            pending: targets.into_iter().collect(),
            holders,
            running: 0,
            held: BTreeSet::new(),
        }
    }

    /// The nodes to start now: as many as there are holders not already serving one.
    pub fn start(&mut self) -> Vec<NodeId> {
        let mut now = Vec::new();
        while self.running < self.holders {
            let Some(node) = self.pending.pop_front() else {
                break;
            };
            self.running += 1;
            now.push(node);
        }
        now
    }

    /// `node` has every blob and is recorded as a holder (its pull goes on unpacking): it
    /// serves the next puller, and its own no longer takes a holder's place.
    pub fn held(&mut self, node: NodeId) {
        if self.held.insert(node) {
            self.running = self.running.saturating_sub(1);
            self.holders += 1;
        }
    }

    /// `node`'s pull ended; if it succeeded, the node is a holder.
    pub fn finished(&mut self, node: NodeId, ok: bool) {
        if ok {
            self.held(node);
        } else if !self.held.contains(&node) {
            self.running = self.running.saturating_sub(1);
        }
    }

    /// No pull to start, none running (some may still be unpacking).
    pub fn is_done(&self) -> bool {
        self.running == 0 && (self.pending.is_empty() || self.holders == 0)
    }
}

/// A pull that failed, in the JSON report.
#[derive(Debug, Serialize)]
struct Failed {
    node: NodeId,
    error: String,
}

/// What `--output json` prints.
#[derive(Debug, Serialize)]
struct Delivery {
    image: String,
    /// Nodes that held it before (nothing to do).
    already: Vec<NodeId>,
    /// Members skipped by `--all`: marked down by the leader, or not yet active.
    skipped_down: Vec<NodeId>,
    pulled: Vec<ImagePulled>,
    failed: Vec<Failed>,
    millis: u64,
}

/// The state of the pulls running, drawn as one line on a terminal.
struct Board {
    tty: bool,
    running: BTreeMap<NodeId, (Instant, u64, u64)>,
    drawn: bool,
}

impl Board {
    fn draw(&mut self) {
        if !self.tty {
            return;
        }
        // A few pulls fit on one line; the rest are counted.
        const SHOWN: usize = 4;
        let mut cells: Vec<String> = self
            .running
            .iter()
            .take(SHOWN)
            .map(|(node, (started, done, total))| {
                let rate = *done as f64 / started.elapsed().as_secs_f64().max(0.001);
                let pct = if *total == 0 {
                    0.0
                } else {
                    *done as f64 * 100.0 / *total as f64
                };
                format!("n{node} {pct:.0}% {}/s", human_bytes(rate as u64))
            })
            .collect();
        if self.running.len() > SHOWN {
            cells.push(format!("{} more", self.running.len() - SHOWN));
        }
        eprint!("\r\x1b[K{}", cells.join(" · "));
        self.drawn = true;
    }

    /// Clears the line so a message can be printed above the next redraw.
    fn clear(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[K");
            self.drawn = false;
        }
    }
}

fn lock(board: &Mutex<Board>) -> Option<std::sync::MutexGuard<'_, Board>> {
    board.lock().ok()
}

/// Delivers image `name` to `to`, or to every member that lacks it (`all`).
pub async fn deliver(ctx: &Context, name: &str, to: Vec<NodeId>, all: bool) -> Result<(), Failure> {
    let (client, contact) = client(ctx).await?;
    let client = Arc::new(client);
    let r = run(ctx, &client, &contact, name, to, all).await;
    client.endpoint().close().await;
    r
}

async fn run(
    ctx: &Context,
    client: &Arc<ApiClient>,
    contact: &EndpointAddr,
    name: &str,
    to: Vec<NodeId>,
    all: bool,
) -> Result<(), Failure> {
    let started = Instant::now();
    let image = client
        .call(
            contact,
            ImageShow {
                name: name.to_string(),
                stale: false,
            },
        )
        .await?
        .image;
    let nodes = client.call(contact, NodeList { stale: false }).await?.nodes;
    let members: BTreeSet<NodeId> = nodes.iter().map(|n| n.member.id).collect();
    // Only members that are up can pull or serve.
    let up = |n: &NodeEntry| n.member.status == MemberStatus::Active && n.down_since_ms.is_none();
    let live_holders = nodes
        .iter()
        .filter(|n| up(n) && image.holders.contains(&n.member.id))
        .count();
    let mut skipped_down = Vec::new();
    let targets: Vec<NodeId> = if all {
        nodes
            .iter()
            .filter(|n| {
                if !up(n) && !image.holders.contains(&n.member.id) {
                    skipped_down.push(n.member.id);
                }
                up(n)
            })
            .map(|n| n.member.id)
            .collect()
    } else {
        let mut seen = BTreeSet::new();
        for node in &to {
            if !members.contains(node) {
                return Err(Failure::new(
                    exit::USAGE,
                    format!("--to: n{node} is not a member"),
                ));
            }
        }
        to.into_iter().filter(|n| seen.insert(*n)).collect()
    };
    let (already, pending): (Vec<NodeId>, Vec<NodeId>) =
        targets.into_iter().partition(|n| image.holders.contains(n));
    if live_holders == 0 && !pending.is_empty() {
        return Err(Failure::new(
            exit::UNAVAILABLE,
            format!("no node that is up holds image {name} completely"),
        ));
    }
    let json = ctx.output == Format::Json;
    if !json {
        for node in &already {
            eprintln!("n{node} already holds {name}");
        }
        for node in &skipped_down {
            eprintln!("n{node} skipped: marked down or not yet active");
        }
    }

    let board = Arc::new(Mutex::new(Board {
        tty: !json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        running: BTreeMap::new(),
        drawn: false,
    }));
    let mut waves = Waves::new(live_holders, pending);
    let mut set = JoinSet::new();
    let mut pulled = Vec::new();
    let mut failed = Vec::new();
    // The exit code of the first failure, and which task pulls for which node.
    let mut code: Option<u8> = None;
    let mut tasks = HashMap::new();
    // Pulls whose node became a holder (their report of it may be lost: then the end of
    // the pull counts).
    let (held_tx, mut held_rx) = tokio::sync::mpsc::unbounded_channel();
    loop {
        for node in waves.start() {
            if let Some(mut b) = lock(&board) {
                b.clear();
                if !json {
                    eprintln!("n{node}: pulling {name}");
                }
                b.running.insert(node, (Instant::now(), 0, image.nar_size));
                b.draw();
            }
            let (client, contact, board) = (client.clone(), contact.clone(), board.clone());
            let held_tx = held_tx.clone();
            let request = ImagePull {
                name: name.to_string(),
                node: Some(node),
            };
            let task = set.spawn(async move {
                client
                    .call_with_progress(&contact, request, |p| {
                        if p.phase == PHASE_HELD {
                            let _ = held_tx.send(node);
                            return;
                        }
                        if let Some(mut b) = lock(&board) {
                            if let Some(entry) = b.running.get_mut(&node) {
                                entry.1 = p.done;
                                entry.2 = p.total;
                            }
                            b.draw();
                        }
                    })
                    .await
            });
            tasks.insert(task.id(), node);
        }
        if waves.is_done() && set.is_empty() {
            break;
        }
        // A pull reports its holder before it ends: take that first.
        let joined = tokio::select! {
            biased;
            Some(node) = held_rx.recv() => {
                waves.held(node);
                continue;
            }
            joined = set.join_next_with_id() => joined,
        };
        let Some(joined) = joined else {
            break;
        };
        let (node, result) = match joined {
            Ok((id, r)) => (tasks.get(&id).copied(), r.map_err(Failure::from)),
            Err(e) => (
                tasks.get(&e.id()).copied(),
                Err(Failure::new(
                    exit::ERROR,
                    format!("the pull task failed: {e}"),
                )),
            ),
        };
        let Some(node) = node else {
            continue;
        };
        waves.finished(node, result.is_ok());
        // Clear, print and redraw under one lock, so no progress update lands mid-line.
        let mut board = lock(&board);
        if let Some(b) = board.as_mut() {
            b.running.remove(&node);
            b.clear();
        }
        match result {
            Ok(p) => {
                if !json {
                    print_pulled(name, &p);
                }
                pulled.push(p);
            }
            Err(f) => {
                if !json {
                    eprintln!("n{node}: failed: {f}");
                }
                code.get_or_insert(f.code);
                failed.push(Failed {
                    node,
                    error: f.message,
                });
            }
        }
        if let Some(b) = board.as_mut() {
            b.draw();
        }
    }
    if let Some(mut b) = lock(&board) {
        b.clear();
    }
    let millis = started.elapsed().as_millis() as u64;
    pulled.sort_by_key(|p| p.node);
    failed.sort_by_key(|f| f.node);
    let outcome = match code {
        Some(code) => {
            let nodes: Vec<String> = failed.iter().map(|f| format!("n{}", f.node)).collect();
            Err(Failure::new(
                code,
                format!(
                    "{} of {} failed ({})",
                    failed.len(),
                    count(pulled.len() + failed.len(), "pull", "pulls"),
                    nodes.join(", ")
                ),
            ))
        }
        None => Ok(()),
    };
    if json {
        output::json(&Delivery {
            image: name.to_string(),
            already,
            skipped_down,
            pulled,
            failed,
            millis,
        })
        .map_err(|e| Failure::new(exit::ERROR, e))?;
    } else if pulled.is_empty() && failed.is_empty() {
        eprintln!("nothing to do: every node asked for holds {name}");
    } else {
        eprintln!(
            "delivered {name} to {} of {} in {:.1} s",
            pulled.len(),
            count(pulled.len() + failed.len(), "node", "nodes"),
            millis as f64 / 1000.0
        );
    }
    outcome
}

/// One line for a node's pull, then one per holder: what it served, or why it was dropped.
pub fn print_pulled(name: &str, p: &ImagePulled) {
    if p.fetched_blobs == 0 {
        eprintln!("n{} already held {name}", p.node);
    } else {
        let secs = (p.millis as f64 / 1000.0).max(0.001);
        eprintln!(
            "n{} fetched {name}: {}, {} in {:.1} s ({}/s)",
            p.node,
            count(p.fetched_blobs as usize, "NAR", "NARs"),
            human_bytes(p.fetched_bytes),
            secs,
            human_bytes((p.fetched_bytes as f64 / secs) as u64)
        );
    }
    for h in &p.holders {
        match &h.error {
            Some(e) => eprintln!("  n{}: dropped: {e}", h.node),
            None => eprintln!(
                "  n{}: {}, {}",
                h.node,
                count(h.blobs as usize, "piece", "pieces"),
                human_bytes(h.bytes)
            ),
        }
    }
    if !p.materialised.is_empty() {
        eprintln!(
            "  unpacked {}",
            count(p.materialised.len(), "store path", "store paths")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u64]) -> Vec<NodeId> {
        v.iter().copied().map(NodeId).collect()
    }

    #[test]
    fn one_holder_doubles_each_round() {
        let mut w = Waves::new(1, ids(&[2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(w.start(), ids(&[2]));
        assert!(w.start().is_empty(), "one holder serves one puller");
        w.finished(NodeId(2), true);
        assert_eq!(w.start(), ids(&[3, 4]));
        w.finished(NodeId(3), true);
        w.finished(NodeId(4), true);
        assert_eq!(w.start(), ids(&[5, 6, 7, 8]));
        for n in 5..=8 {
            assert!(!w.is_done());
            w.finished(NodeId(n), true);
        }
        assert!(w.is_done());
    }

    #[test]
    fn a_finished_puller_starts_the_next_without_waiting_for_the_round() {
        let mut w = Waves::new(2, ids(&[3, 4, 5]));
        assert_eq!(w.start(), ids(&[3, 4]));
        w.finished(NodeId(3), true);
        // n3 holds it now: two holders are free (n3 and the one n3 used).
        assert_eq!(w.start(), ids(&[5]));
        w.finished(NodeId(4), true);
        w.finished(NodeId(5), true);
        assert!(w.is_done());
    }

    #[test]
    fn a_node_that_holds_it_serves_the_next_while_it_unpacks() {
        let mut w = Waves::new(1, ids(&[2, 3, 4]));
        assert_eq!(w.start(), ids(&[2]));
        w.held(NodeId(2));
        assert_eq!(w.start(), ids(&[3, 4]), "n2 serves while it unpacks");
        // Its pull ending (even failing in the unpack) counts it once only.
        w.finished(NodeId(2), false);
        w.held(NodeId(2));
        assert!(w.start().is_empty());
        w.finished(NodeId(3), true);
        w.finished(NodeId(4), true);
        assert!(w.is_done());
    }

    #[test]
    fn a_failed_pull_adds_no_holder_and_the_rest_go_on() {
        let mut w = Waves::new(1, ids(&[2, 3, 4]));
        assert_eq!(w.start(), ids(&[2]));
        w.finished(NodeId(2), false);
        assert_eq!(w.start(), ids(&[3]));
        w.finished(NodeId(3), true);
        assert_eq!(w.start(), ids(&[4]));
        w.finished(NodeId(4), true);
        assert!(w.is_done());
    }

    #[test]
    fn without_a_holder_nothing_starts_and_it_ends() {
        let mut w = Waves::new(0, ids(&[2, 3]));
        assert!(w.start().is_empty());
        assert!(w.is_done());
        let mut empty = Waves::new(1, ids(&[]));
        assert!(empty.start().is_empty());
        assert!(empty.is_done());
    }
}
