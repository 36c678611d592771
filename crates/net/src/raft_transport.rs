//! `blixard/raft/1`: raft messages between members.
//!
//! Each sender keeps one connection and one stream per peer, opened with a [`Hello`] that
//! the receiver checks against the cluster's membership before it reads anything else.
//! Messages are batched per frame; snapshots go in chunks. A peer that cannot be reached is
//! retried with exponential backoff; raft itself tolerates the messages lost meanwhile. A
//! peer that restarted is dialled again at once ([`Restarts`]), not after QUIC's idle
//! timeout: lost votes and appends there made elections after a restart take seconds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blixard_core::{ClusterId, EndpointKey, NodeId};
use blixard_raft::{decode_message, encode_message, Message, RaftNode, Transport};
use iroh::endpoint::{Connection, SendStream};
use iroh::protocol::{AcceptError, ProtocolHandler};
use iroh::{Endpoint, EndpointAddr};
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::frame::{self, FrameError};
use crate::{key_of, RAFT_ALPN};

/// Snapshot chunk size.
const CHUNK: usize = 256 * 1024;
/// Messages queued per peer before new ones are dropped (raft resends).
const QUEUE: usize = 8192;
/// Messages per batch frame.
const BATCH: usize = 512;

/// The first frame on a raft stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    pub cluster: ClusterId,
    pub from: NodeId,
    pub to: NodeId,
    /// The sending process's incarnation (random at its start): a new one tells the
    /// receiver its peer restarted, so the receiver's own connection to it is dead and is
    /// replaced at once ([`Restarts`]). Last and optional on the wire, as a request
    /// frame's trace context: older nodes neither send nor read it.
    #[serde(default, deserialize_with = "trailing_incarnation")]
    pub incarnation: Option<u64>,
    /// What the sender runs: its log version decides the cluster version (see the node's
    /// `version` module). Last and optional, as the incarnation: a hello without it is
    /// from a release before the cluster version, which applies log version 1.
    #[serde(default, deserialize_with = "trailing_version")]
    pub version: Option<PeerVersion>,
}

fn trailing_incarnation<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(Option::<u64>::deserialize(d).ok().flatten())
}

fn trailing_version<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<PeerVersion>, D::Error> {
    Ok(Option::<PeerVersion>::deserialize(d)
        .ok()
        .flatten()
        .filter(|v| v.release.len() <= PeerVersion::MAX_RELEASE))
}

/// What a member runs, as its raft hello says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerVersion {
    /// The newest log version it applies (`blixard_core::LOG_VERSION`).
    pub log: u32,
    /// Its release (`CARGO_PKG_VERSION`), to show.
    pub release: String,
}

impl PeerVersion {
    /// A longer release string is not believed (the hello reads as without a version).
    pub const MAX_RELEASE: usize = 64;
}

/// What each peer that opened a raft stream to this node said it runs, from its latest
/// hello: `Some(None)` for a peer whose hello said nothing (an older release).
#[derive(Clone, Default)]
pub struct PeerVersions(Arc<Mutex<HashMap<NodeId, Option<PeerVersion>>>>);

impl PeerVersions {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Option<PeerVersion>>> {
        match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Records `peer`'s hello.
    pub fn saw(&self, peer: NodeId, version: Option<PeerVersion>) {
        self.map().insert(peer, version);
    }

    /// What `peer` last said it runs: `None` if it has not opened a stream to this node
    /// since it started; `Some(None)` if its hello said nothing.
    pub fn of(&self, peer: NodeId) -> Option<Option<PeerVersion>> {
        self.map().get(&peer).cloned()
    }

    /// The log version `peer` applies, as far as this node knows: 1 for a peer whose
    /// hello said nothing; `None` if it has not been heard from.
    pub fn log_version(&self, peer: NodeId) -> Option<u32> {
        self.of(peer).map(|v| v.map_or(1, |v| v.log))
    }
}

/// The incarnations of the peers that opened raft streams to this node, and a signal per
/// peer for its sender to reconnect when the peer turns out to have restarted.
///
/// Why: a peer killed and started again keeps its endpoint id and address, but the
/// connection this node opened to its old process is dead, and QUIC notices only at its
/// idle timeout. Meanwhile every message to the peer is lost: its votes, its log. The
/// restarted peer's first stream to this node carries a new incarnation; the sender then
/// drops its connection and dials again, at once.
#[derive(Clone, Default)]
pub struct Restarts(Arc<Mutex<RestartBook>>);

#[derive(Default)]
struct RestartBook {
    seen: HashMap<NodeId, u64>,
    /// Per peer, how many restarts were seen: a sender reconnects when it changes while
    /// the sender runs (one created later has nothing to replace).
    signals: HashMap<NodeId, tokio::sync::watch::Sender<u64>>,
}

impl Restarts {
    fn book(&self) -> std::sync::MutexGuard<'_, RestartBook> {
        match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The signal the sender to `peer` waits on: it changes at the peer's next restart.
    fn signal(&self, peer: NodeId) -> tokio::sync::watch::Receiver<u64> {
        self.book()
            .signals
            .entry(peer)
            .or_insert_with(|| tokio::sync::watch::channel(0).0)
            .subscribe()
    }

    /// Records `peer`'s incarnation from its hello; a change from the one seen before
    /// signals the sender to `peer` to reconnect. Returns whether it did.
    pub fn saw(&self, peer: NodeId, incarnation: u64) -> bool {
        let mut book = self.book();
        let restarted = book
            .seen
            .insert(peer, incarnation)
            .is_some_and(|before| before != incarnation);
        if restarted {
            if let Some(signal) = book.signals.get(&peer) {
                signal.send_modify(|n| *n += 1);
            }
        }
        restarted
    }
}

/// Why a node refuses a raft stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("peer belongs to cluster {0}")]
    WrongCluster(String),
    #[error("node {0} was removed from the cluster")]
    Removed(NodeId),
    #[error("endpoint is not the member with id {0}")]
    NotMember(NodeId),
    #[error("peer is node {actual}, not {expected}")]
    WrongNode { expected: NodeId, actual: NodeId },
}

/// A frame on a raft stream after the hello (public for the fuzz corpus and tests).
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftFrame {
    Batch(Vec<Vec<u8>>),
    /// A message whose snapshot data follows in chunks.
    SnapshotStart {
        message: Vec<u8>,
        len: u64,
    },
    SnapshotChunk(Vec<u8>),
    SnapshotEnd,
}

/// What the transport needs to know about the cluster: where peers are, and who may talk.
pub trait PeerBook: Send + Sync + 'static {
    fn addr_of(&self, node: NodeId) -> Option<EndpointAddr>;
    /// Checks an incoming stream: is `key` the member `from`?
    fn admit(&self, key: &EndpointKey, from: NodeId) -> Result<(), Refusal>;
    /// A peer refused us; `Removed(me)` means this node must stop.
    fn refused(&self, refusal: Refusal);
}

/// The sending side: one task per peer.
pub struct IrohTransport {
    endpoint: Endpoint,
    cluster: ClusterId,
    me: NodeId,
    book: Arc<dyn PeerBook>,
    runtime: Handle,
    peers: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    links: Links,
    restarts: Restarts,
    /// This process's incarnation, sent in every hello.
    incarnation: u64,
    /// What this node runs, sent in every hello.
    version: Option<PeerVersion>,
}

/// The connection each peer's sender holds now, for the transport metrics.
#[derive(Clone, Default)]
pub struct Links(Arc<Mutex<HashMap<NodeId, Connection>>>);

/// One peer's connection as the metrics see it.
#[derive(Clone, Debug, PartialEq)]
pub struct Link {
    pub peer: NodeId,
    /// The path in use goes through a relay (not a direct UDP path).
    pub relayed: bool,
    pub rtt: Duration,
}

impl Links {
    fn set(&self, peer: NodeId, conn: Option<Connection>) {
        let mut links = match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        match conn {
            Some(c) => links.insert(peer, c),
            None => links.remove(&peer),
        };
    }

    /// The open connections to peers, with the path each uses and its round-trip time.
    pub fn snapshot(&self) -> Vec<Link> {
        let links = match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut out: Vec<Link> = links
            .iter()
            .filter(|(_, c)| c.close_reason().is_none())
            .filter_map(|(peer, c)| {
                let paths = c.paths();
                let path = paths.iter().find(|p| p.is_selected())?;
                Some(Link {
                    peer: *peer,
                    relayed: path.is_relay(),
                    rtt: path.rtt(),
                })
            })
            .collect();
        out.sort_by_key(|l| l.peer);
        out
    }
}

impl IrohTransport {
    pub fn new(
        endpoint: Endpoint,
        cluster: ClusterId,
        me: NodeId,
        book: Arc<dyn PeerBook>,
        runtime: Handle,
    ) -> Self {
        Self {
            endpoint,
            cluster,
            me,
            book,
            runtime,
            peers: Mutex::new(HashMap::new()),
            links: Links::default(),
            restarts: Restarts::default(),
            incarnation: rand::random(),
            version: None,
        }
    }

    /// Says in every hello what this node runs.
    pub fn with_version(mut self, version: PeerVersion) -> Self {
        self.version = Some(version);
        self
    }

    /// The peers' connections, for the metrics.
    pub fn links(&self) -> Links {
        self.links.clone()
    }

    /// Where the receiving side reports peers' incarnations (for [`RaftHandler::new`]).
    pub fn restarts(&self) -> Restarts {
        self.restarts.clone()
    }

    /// Connects to `peers` now rather than at the first message, so that they learn at
    /// once that this process is new (its hello's incarnation) and replace their dead
    /// connections to its predecessor. For a node's start.
    pub fn greet(&self, peers: impl IntoIterator<Item = u64>) {
        for peer in peers {
            if peer != self.me.0 {
                self.sender(peer, true);
            }
        }
    }

    fn queue(&self, to: u64) -> Option<mpsc::Sender<Message>> {
        self.sender(to, false)
    }

    fn sender(&self, to: u64, eager: bool) -> Option<mpsc::Sender<Message>> {
        let mut peers = self.peers.lock().ok()?;
        if let Some(tx) = peers.get(&to) {
            if !tx.is_closed() {
                return Some(tx.clone());
            }
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let peer = Peer {
            endpoint: self.endpoint.clone(),
            hello: Hello {
                cluster: self.cluster,
                from: self.me,
                to: NodeId(to),
                incarnation: Some(self.incarnation),
                version: self.version.clone(),
            },
            book: self.book.clone(),
            links: self.links.clone(),
            restarted: self.restarts.signal(NodeId(to)),
        };
        self.runtime.spawn(peer.run(rx, eager));
        peers.insert(to, tx.clone());
        Some(tx)
    }
}

impl Transport for IrohTransport {
    fn send(&self, messages: Vec<Message>) {
        for msg in messages {
            if let Some(tx) = self.queue(msg.to) {
                // A full queue means the peer is unreachable or slow: drop, raft resends.
                let _ = tx.try_send(msg);
            }
        }
    }
}

struct Peer {
    endpoint: Endpoint,
    hello: Hello,
    book: Arc<dyn PeerBook>,
    links: Links,
    /// Changes when the peer turns out to have restarted ([`Restarts`]).
    restarted: tokio::sync::watch::Receiver<u64>,
}

impl Peer {
    async fn run(self, mut rx: mpsc::Receiver<Message>, mut eager: bool) {
        let mut backoff = Duration::from_millis(50);
        let mut restarted = self.restarted.clone();
        loop {
            // Only a restart seen from now on replaces this session's connection.
            restarted.mark_unchanged();
            let ended = tokio::select! {
                r = self.session(&mut rx, eager) => r,
                Ok(()) = restarted.changed() => Err(SessionError::Restarted),
            };
            eager = false;
            self.links.set(self.hello.to, None);
            match ended {
                Ok(()) => return, // channel closed: transport dropped
                Err(SessionError::Restarted) => {
                    tracing::debug!(peer = %self.hello.to, "peer restarted; connecting again");
                    backoff = Duration::from_millis(50);
                    continue;
                }
                Err(SessionError::Refused(r)) => {
                    tracing::warn!(peer = %self.hello.to, "peer refused raft stream: {r}");
                    self.book.refused(r);
                }
                Err(SessionError::Other(e)) => {
                    tracing::debug!(peer = %self.hello.to, "raft stream failed: {e}");
                }
            }
            // Drop what queued up while we were failing; raft resends what matters.
            let deadline = tokio::time::Instant::now() + backoff;
            loop {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// One connection's life. It dials when there is something to send, or at once when
    /// `eager` (greeting the peer at start).
    async fn session(
        &self,
        rx: &mut mpsc::Receiver<Message>,
        eager: bool,
    ) -> Result<(), SessionError> {
        let first = if eager {
            None
        } else {
            match rx.recv().await {
                Some(m) => Some(m),
                None => return Ok(()),
            }
        };
        let addr = self
            .book
            .addr_of(self.hello.to)
            .ok_or_else(|| SessionError::Other(format!("no address for node {}", self.hello.to)))?;
        let conn: Connection = tokio::time::timeout(
            Duration::from_secs(5),
            self.endpoint.connect(addr, RAFT_ALPN),
        )
        .await
        .map_err(|_| SessionError::Other("connect timed out".into()))?
        .map_err(|e| SessionError::Other(e.to_string()))?;
        let (mut send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| SessionError::Other(e.to_string()))?;
        frame::write(&mut send, &self.hello).await?;
        let mut recv = frame::Reader::new(recv);
        let ack: Result<(), Refusal> = recv.read().await?;
        ack.map_err(SessionError::Refused)?;
        self.links.set(self.hello.to, Some(conn.clone()));
        let mut pending: Vec<Message> = first.into_iter().collect();
        loop {
            while pending.len() < BATCH {
                match rx.try_recv() {
                    Ok(m) => pending.push(m),
                    Err(_) => break,
                }
            }
            write_messages(&mut send, std::mem::take(&mut pending)).await?;
            match rx.recv().await {
                Some(m) => pending.push(m),
                None => return Ok(()),
            }
        }
    }
}

enum SessionError {
    Refused(Refusal),
    /// The peer restarted: this connection goes to its old process.
    Restarted,
    Other(String),
}

impl From<FrameError> for SessionError {
    fn from(e: FrameError) -> Self {
        SessionError::Other(e.to_string())
    }
}

async fn write_messages(send: &mut SendStream, messages: Vec<Message>) -> Result<(), SessionError> {
    let mut batch = Vec::new();
    for mut msg in messages {
        if msg.has_snapshot() && !msg.get_snapshot().data.is_empty() {
            if !batch.is_empty() {
                frame::write(send, &RaftFrame::Batch(std::mem::take(&mut batch))).await?;
            }
            let data = std::mem::take(&mut msg.mut_snapshot().data);
            let header = encode_message(&msg).map_err(|e| SessionError::Other(e.to_string()))?;
            frame::write(
                send,
                &RaftFrame::SnapshotStart {
                    message: header,
                    len: data.len() as u64,
                },
            )
            .await?;
            for chunk in data.chunks(CHUNK) {
                frame::write(send, &RaftFrame::SnapshotChunk(chunk.to_vec())).await?;
            }
            frame::write(send, &RaftFrame::SnapshotEnd).await?;
            tracing::info!(to = msg.to, bytes = data.len(), "sent snapshot");
        } else {
            batch.push(encode_message(&msg).map_err(|e| SessionError::Other(e.to_string()))?);
        }
    }
    if !batch.is_empty() {
        frame::write(send, &RaftFrame::Batch(batch)).await?;
    }
    Ok(())
}

/// The receiving side, registered for [`RAFT_ALPN`].
pub struct RaftHandler {
    node: RaftNode,
    cluster: ClusterId,
    book: Arc<dyn PeerBook>,
    restarts: Restarts,
    versions: PeerVersions,
}

impl std::fmt::Debug for RaftHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftHandler").finish_non_exhaustive()
    }
}

impl RaftHandler {
    /// `restarts` is the sending side's ([`IrohTransport::restarts`]); `versions` is
    /// where what each peer runs is recorded.
    pub fn new(
        node: RaftNode,
        cluster: ClusterId,
        book: Arc<dyn PeerBook>,
        restarts: Restarts,
        versions: PeerVersions,
    ) -> Self {
        Self {
            node,
            cluster,
            book,
            restarts,
            versions,
        }
    }

    fn check(&self, key: &EndpointKey, hello: &Hello) -> Result<(), Refusal> {
        if hello.cluster != self.cluster {
            return Err(Refusal::WrongCluster(self.cluster.to_string()));
        }
        if hello.to != self.node.id() {
            return Err(Refusal::WrongNode {
                expected: hello.to,
                actual: self.node.id(),
            });
        }
        self.book.admit(key, hello.from)
    }
}

impl ProtocolHandler for RaftHandler {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let key = key_of(&conn.remote_id());
        while let Ok((mut send, recv)) = conn.accept_bi().await {
            // One reader for the stream's life: it may already hold the first raft frames.
            let mut recv = frame::Reader::new(recv);
            let hello: Hello = match recv.read().await {
                Ok(h) => h,
                Err(e) => {
                    tracing::debug!(peer = %key, "bad raft hello: {e}");
                    return Ok(());
                }
            };
            let verdict = self.check(&key, &hello);
            let _ = frame::write(&mut send, &verdict).await;
            if let Err(refusal) = verdict {
                tracing::warn!(peer = %key, from = %hello.from, "refused raft stream: {refusal}");
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
                conn.close(1u32.into(), b"refused");
                return Ok(());
            }
            self.versions.saw(hello.from, hello.version.clone());
            if let Some(incarnation) = hello.incarnation {
                if self.restarts.saw(hello.from, incarnation) {
                    tracing::info!(peer = %hello.from, "peer restarted; connecting to it again");
                }
            }
            let node = self.node.clone();
            let from = hello.from;
            let book = self.book.clone();
            let conn = conn.clone();
            tokio::spawn(async move {
                match receive(node, from, key, book, recv).await {
                    Err(FrameError::Malformed(e)) if e.starts_with(NO_LONGER) => {
                        tracing::warn!(peer = %from, "closing raft stream: {e}");
                        conn.close(2u32.into(), b"no longer a member");
                    }
                    Err(e) => tracing::debug!(peer = %from, "raft stream ended: {e}"),
                    Ok(()) => {}
                }
            });
        }
        Ok(())
    }
}

const NO_LONGER: &str = "no longer admitted";

/// The largest snapshot a receiver reassembles.
pub const MAX_SNAPSHOT: u64 = 4 * 1024 * 1024 * 1024;

/// What a receiver makes of a raft stream's frames after the hello: the messages to step,
/// each checked against the stream's ends, with snapshots reassembled from their chunks.
/// Pure, so the fuzz target runs exactly what a node runs on a peer's bytes.
#[derive(Debug)]
pub struct Inbound {
    from: NodeId,
    to: NodeId,
    /// A snapshot being received: its message, the data so far, the announced length.
    snapshot: Option<(Message, Vec<u8>, u64)>,
}

impl Inbound {
    /// A stream from member `from` to this node, `to`.
    pub fn new(from: NodeId, to: NodeId) -> Self {
        Self {
            from,
            to,
            snapshot: None,
        }
    }

    fn check(&self, m: &Message) -> Result<(), FrameError> {
        if m.from != self.from.0 || m.to != self.to.0 {
            return Err(FrameError::Malformed(format!(
                "message from {} to {} on the stream of node {}",
                m.from, m.to, self.from
            )));
        }
        Ok(())
    }

    /// Decodes one frame body; returns the messages it completes, in order.
    pub fn frame(&mut self, body: &[u8]) -> Result<Vec<Message>, FrameError> {
        let decode =
            |bytes: &[u8]| decode_message(bytes).map_err(|e| FrameError::Malformed(e.to_string()));
        match frame::decode::<RaftFrame>(body)? {
            RaftFrame::Batch(msgs) => {
                let mut out = Vec::with_capacity(msgs.len());
                for bytes in msgs {
                    // Safe to decode: the peer is an authenticated member (see `admit`).
                    let msg = decode(&bytes)?;
                    self.check(&msg)?;
                    out.push(msg);
                }
                Ok(out)
            }
            RaftFrame::SnapshotStart { message, len } => {
                let msg = decode(&message)?;
                self.check(&msg)?;
                if len > MAX_SNAPSHOT {
                    return Err(FrameError::TooLarge(
                        usize::try_from(len).unwrap_or(usize::MAX),
                        usize::try_from(MAX_SNAPSHOT).unwrap_or(usize::MAX),
                    ));
                }
                self.snapshot = Some((msg, Vec::new(), len));
                Ok(Vec::new())
            }
            RaftFrame::SnapshotChunk(chunk) => match self.snapshot.as_mut() {
                Some((_, data, len)) if (data.len() + chunk.len()) as u64 <= *len => {
                    data.extend_from_slice(&chunk);
                    Ok(Vec::new())
                }
                _ => Err(FrameError::Malformed("unexpected snapshot chunk".into())),
            },
            RaftFrame::SnapshotEnd => match self.snapshot.take() {
                Some((mut msg, data, len)) if data.len() as u64 == len => {
                    tracing::info!(from = %self.from, bytes = len, "received snapshot");
                    msg.mut_snapshot().data = data.into();
                    Ok(vec![msg])
                }
                _ => Err(FrameError::Malformed("incomplete snapshot".into())),
            },
        }
    }
}

async fn receive(
    node: RaftNode,
    from: NodeId,
    key: EndpointKey,
    book: Arc<dyn PeerBook>,
    mut recv: frame::Reader,
) -> Result<(), FrameError> {
    let mut inbound = Inbound::new(from, node.id());
    while let Some(body) = recv.read_raw().await? {
        // A member removed while its stream is open is cut off at its next frame.
        if let Err(refusal) = book.admit(&key, from) {
            return Err(FrameError::Malformed(format!("{NO_LONGER}: {refusal}")));
        }
        for msg in inbound.frame(&body)? {
            node.step(msg);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::MessageType;

    fn msg(from: u64, to: u64) -> Message {
        Message {
            from,
            to,
            ..Message::default()
        }
    }

    fn body(f: &RaftFrame) -> Vec<u8> {
        frame::encode(f).unwrap()[4..].to_vec()
    }

    fn batch(msgs: &[Message]) -> Vec<u8> {
        body(&RaftFrame::Batch(
            msgs.iter().map(|m| encode_message(m).unwrap()).collect(),
        ))
    }

    #[test]
    fn a_new_incarnation_of_a_known_peer_signals_its_sender() {
        let r = Restarts::default();
        let mut signal = r.signal(NodeId(2));
        assert!(!r.saw(NodeId(2), 10), "the first hello is no restart");
        assert!(
            !r.saw(NodeId(2), 10),
            "nor is a reconnect of the same process"
        );
        assert!(r.saw(NodeId(2), 11));
        // The running sender sees the change; one created afterwards does not.
        assert!(signal.has_changed().unwrap());
        let later = r.signal(NodeId(2));
        assert!(!later.has_changed().unwrap());
        signal.mark_unchanged();
        assert!(!r.saw(NodeId(3), 11), "per peer");
        assert!(!signal.has_changed().unwrap());
    }

    #[test]
    fn a_hello_without_an_incarnation_is_an_older_peer() {
        #[derive(serde::Serialize)]
        struct OldHello {
            cluster: ClusterId,
            from: NodeId,
            to: NodeId,
        }
        let old = OldHello {
            cluster: ClusterId([1; 16]),
            from: NodeId(1),
            to: NodeId(2),
        };
        let h: Hello = frame::decode(&postcard::to_stdvec(&old).unwrap()).unwrap();
        assert_eq!((h.from, h.to, h.incarnation), (NodeId(1), NodeId(2), None));
        let new = Hello {
            incarnation: Some(5),
            ..h
        };
        let bytes = postcard::to_stdvec(&new).unwrap();
        assert_eq!(frame::decode::<Hello>(&bytes).unwrap().incarnation, Some(5));
        assert_eq!(frame::decode::<Hello>(&bytes).unwrap().version, None);
    }

    #[test]
    fn a_hello_says_what_its_sender_runs_and_older_nodes_read_past_it() {
        let version = PeerVersion {
            log: 2,
            release: "0.1.0".into(),
        };
        let hello = Hello {
            cluster: ClusterId([1; 16]),
            from: NodeId(1),
            to: NodeId(2),
            incarnation: Some(9),
            version: Some(version.clone()),
        };
        let bytes = postcard::to_stdvec(&hello).unwrap();
        let back: Hello = frame::decode(&bytes).unwrap();
        assert_eq!(back.version, Some(version));
        // A node of the incarnation's time reads the same bytes, ignoring the rest.
        #[derive(serde::Deserialize)]
        struct Older {
            _cluster: ClusterId,
            from: NodeId,
            _to: NodeId,
            incarnation: Option<u64>,
        }
        let older: Older = frame::decode(&bytes).unwrap();
        assert_eq!((older.from, older.incarnation), (NodeId(1), Some(9)));
        // A release string past the limit is not believed.
        let long = Hello {
            version: Some(PeerVersion {
                log: 2,
                release: "x".repeat(PeerVersion::MAX_RELEASE + 1),
            }),
            ..back
        };
        let bytes = postcard::to_stdvec(&long).unwrap();
        assert_eq!(frame::decode::<Hello>(&bytes).unwrap().version, None);
        // The book: unheard, said nothing (an older release: 1), said its version.
        let book = PeerVersions::default();
        assert_eq!(book.log_version(NodeId(3)), None);
        book.saw(NodeId(3), None);
        assert_eq!(book.log_version(NodeId(3)), Some(1));
        book.saw(
            NodeId(3),
            Some(PeerVersion {
                log: 2,
                release: "0.1.0".into(),
            }),
        );
        assert_eq!(book.log_version(NodeId(3)), Some(2));
    }

    #[test]
    fn messages_must_match_the_stream_they_arrive_on() {
        let mut inbound = Inbound::new(NodeId(1), NodeId(2));
        let got = inbound.frame(&batch(&[msg(1, 2), msg(1, 2)])).unwrap();
        assert_eq!(got.len(), 2);
        for spoofed in [msg(3, 2), msg(1, 3)] {
            assert!(matches!(
                inbound.frame(&batch(&[msg(1, 2), spoofed])),
                Err(FrameError::Malformed(e)) if e.contains("on the stream of node 1")
            ));
        }
        // Neither a frame nor a protobuf message.
        assert!(inbound.frame(&[0xff; 3]).is_err());
        assert!(inbound
            .frame(&body(&RaftFrame::Batch(vec![vec![0xff; 3]])))
            .is_err());
    }

    #[test]
    fn snapshots_are_reassembled_within_their_announced_length() {
        let mut snap = msg(1, 2);
        snap.set_msg_type(MessageType::MsgSnapshot);
        snap.mut_snapshot().mut_metadata().index = 7;
        let start = |len| {
            body(&RaftFrame::SnapshotStart {
                message: encode_message(&snap).unwrap(),
                len,
            })
        };
        let chunk = |b: &[u8]| body(&RaftFrame::SnapshotChunk(b.to_vec()));
        let end = body(&RaftFrame::SnapshotEnd);

        let mut inbound = Inbound::new(NodeId(1), NodeId(2));
        assert!(inbound.frame(&start(4)).unwrap().is_empty());
        assert!(inbound.frame(&chunk(&[1, 2])).unwrap().is_empty());
        assert!(inbound.frame(&chunk(&[3, 4])).unwrap().is_empty());
        let done = inbound.frame(&end).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].get_snapshot().data.as_ref(), &[1, 2, 3, 4]);
        assert_eq!(done[0].get_snapshot().get_metadata().index, 7);

        // More than announced, less than announced, chunks or an end without a start.
        let mut inbound = Inbound::new(NodeId(1), NodeId(2));
        inbound.frame(&start(2)).unwrap();
        assert!(inbound.frame(&chunk(&[1, 2, 3])).is_err());
        let mut inbound = Inbound::new(NodeId(1), NodeId(2));
        inbound.frame(&start(2)).unwrap();
        inbound.frame(&chunk(&[1])).unwrap();
        assert!(inbound.frame(&end).is_err());
        let mut inbound = Inbound::new(NodeId(1), NodeId(2));
        assert!(inbound.frame(&chunk(&[1])).is_err());
        assert!(inbound.frame(&end).is_err());
        // An announced length over the limit is refused before anything is kept.
        assert!(matches!(
            inbound.frame(&start(MAX_SNAPSHOT + 1)),
            Err(FrameError::TooLarge(..))
        ));
    }
}
