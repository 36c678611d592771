//! `blixard/raft/1`: raft messages between members.
//!
//! Each sender keeps one connection and one stream per peer, opened with a [`Hello`] that
//! the receiver checks against the cluster's membership before it reads anything else.
//! Messages are batched per frame; snapshots go in chunks. A peer that cannot be reached is
//! retried with exponential backoff; raft itself tolerates the messages lost meanwhile.

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

#[derive(Debug, Serialize, Deserialize)]
enum RaftFrame {
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
        }
    }

    fn queue(&self, to: u64) -> Option<mpsc::Sender<Message>> {
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
            },
            book: self.book.clone(),
        };
        self.runtime.spawn(peer.run(rx));
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
}

impl Peer {
    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.session(&mut rx).await {
                Ok(()) => return, // channel closed: transport dropped
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

    async fn session(&self, rx: &mut mpsc::Receiver<Message>) -> Result<(), SessionError> {
        // Wait for something to send before connecting.
        let Some(first) = rx.recv().await else {
            return Ok(());
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
        let mut pending = vec![first];
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
}

impl std::fmt::Debug for RaftHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftHandler").finish_non_exhaustive()
    }
}

impl RaftHandler {
    pub fn new(node: RaftNode, cluster: ClusterId, book: Arc<dyn PeerBook>) -> Self {
        Self {
            node,
            cluster,
            book,
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

async fn receive(
    node: RaftNode,
    from: NodeId,
    key: EndpointKey,
    book: Arc<dyn PeerBook>,
    mut recv: frame::Reader,
) -> Result<(), FrameError> {
    let mut snapshot: Option<(Message, Vec<u8>, u64)> = None;
    let check = |m: &Message| {
        if m.from != from.0 || m.to != node.id().0 {
            return Err(FrameError::Malformed(format!(
                "message from {} to {} on the stream of node {from}",
                m.from, m.to
            )));
        }
        Ok(())
    };
    while let Some(body) = recv.read_raw().await? {
        // A member removed while its stream is open is cut off at its next frame.
        if let Err(refusal) = book.admit(&key, from) {
            return Err(FrameError::Malformed(format!("{NO_LONGER}: {refusal}")));
        }
        match frame::decode::<RaftFrame>(&body)? {
            RaftFrame::Batch(msgs) => {
                for bytes in msgs {
                    // Safe to decode: the peer is an authenticated member (see `admit`).
                    let msg =
                        decode_message(&bytes).map_err(|e| FrameError::Malformed(e.to_string()))?;
                    check(&msg)?;
                    node.step(msg);
                }
            }
            RaftFrame::SnapshotStart { message, len } => {
                let msg =
                    decode_message(&message).map_err(|e| FrameError::Malformed(e.to_string()))?;
                check(&msg)?;
                if len > 4 * 1024 * 1024 * 1024 {
                    return Err(FrameError::TooLarge(len as usize));
                }
                snapshot = Some((msg, Vec::new(), len));
            }
            RaftFrame::SnapshotChunk(chunk) => match snapshot.as_mut() {
                Some((_, data, len)) if (data.len() + chunk.len()) as u64 <= *len => {
                    data.extend_from_slice(&chunk)
                }
                _ => return Err(FrameError::Malformed("unexpected snapshot chunk".into())),
            },
            RaftFrame::SnapshotEnd => match snapshot.take() {
                Some((mut msg, data, len)) if data.len() as u64 == len => {
                    tracing::info!(from = %from, bytes = len, "received snapshot");
                    msg.mut_snapshot().data = data.into();
                    node.step(msg);
                }
                _ => return Err(FrameError::Malformed("incomplete snapshot".into())),
            },
        }
    }
    Ok(())
}
