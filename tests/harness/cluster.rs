//! A cluster of nodes under one temp dir.

use std::time::Duration;

use crate::{wait_for, Node};

/// A cluster of nodes under one temp dir.
pub struct Cluster {
    pub root: tempfile::TempDir,
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `n` nodes: the first with `--init`, the others joining with fresh tokens,
    /// and waits until all are voters.
    pub fn start(n: usize, extra: &[&str]) -> Self {
        Self::start_each(n, |node| {
            node.extra = extra.iter().map(|s| s.to_string()).collect();
        })
    }

    /// [`Self::start`], with `setup` run on each node (n1, n2, …) before it starts.
    pub fn start_each(n: usize, mut setup: impl FnMut(&mut Node)) -> Self {
        let root = tempfile::Builder::new()
            .prefix("blixard-test")
            .tempdir()
            .unwrap();
        let mut nodes: Vec<Node> = (1..=n)
            .map(|i| Node::new(root.path(), &format!("n{i}")))
            .collect();
        for node in &mut nodes {
            setup(node);
        }
        Self::start_nodes(root, nodes)
    }

    /// Starts `nodes` (made under `root`, set up as the caller wants): the first with
    /// `--init`, the others joining with fresh tokens; waits until all are voters.
    pub fn start_nodes(root: tempfile::TempDir, mut nodes: Vec<Node>) -> Self {
        let n = nodes.len();
        nodes[0].start(&["--init"]);
        let mut cluster = Self { root, nodes };
        for i in 1..n {
            let ticket = cluster.token();
            cluster.nodes[i].start(&["--join", &ticket]);
        }
        cluster.wait_voters(n);
        cluster
    }

    pub fn token(&self) -> String {
        self.nodes[0]
            .cli_ok(&["cluster", "token", "create", "--ttl", "5m"])
            .trim()
            .to_string()
    }

    /// Waits until `n` members are voters, as seen (linearizably) from the first node.
    pub fn wait_voters(&self, n: usize) {
        let node = self.nodes.iter().find(|n| n.child.is_some()).unwrap();
        wait_for(&format!("{n} voters"), Duration::from_secs(60), || {
            let s = node.status(false)?;
            let voters = s["raft"]["voters"].as_array().map(|v| v.len()).unwrap_or(0);
            let members = s["members"].as_array().map(|m| m.len()).unwrap_or(0);
            if voters == n && members == n {
                Ok(())
            } else {
                Err(format!("{voters} voters, {members} members: {s}"))
            }
        });
    }

    /// The current leader's index in `nodes`, agreed by every running node.
    pub fn leader(&self) -> usize {
        wait_for("a leader", Duration::from_secs(60), || {
            let mut leader = None;
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let s = node.status(true)?;
                let l = s["raft"]["leader"]
                    .as_u64()
                    .ok_or(format!("{} sees no leader", node.name))?;
                if leader.is_some_and(|x| x != l) {
                    return Err(format!("nodes disagree on the leader: {leader:?} vs {l}"));
                }
                leader = Some(l);
            }
            let l = leader.ok_or("no node running")?;
            let idx = (l - 1) as usize;
            if self.nodes.get(idx).is_some_and(|n| n.child.is_some()) {
                Ok(idx)
            } else {
                Err(format!("leader n{l} is not running"))
            }
        })
    }
}
