//! Fetching an image from the nodes that hold it.
//!
//! The hash sequence and the manifest come from the first holder that answers. The NARs
//! this node lacks are cut into pieces (whole blobs, and 16 MiB ranges of large blobs) and
//! pulled from a shared queue by a few concurrent streams per holder, so several holders
//! (and several streams of one) serve at once. Every byte is checked against the BLAKE3 tree of the
//! blob it belongs to as it arrives; a holder that sends anything else, or vanishes, is
//! dropped with its reason and its piece goes back in the queue for the others.
//!
//! Nodes that hold part of a large blob (typically because they are fetching the same
//! image at the same time) serve too: this node watches which chunks each such peer has
//! (an iroh-blobs observe request) and asks it only for pieces inside them. Every fetcher
//! takes the pieces in its own random order, so concurrent fetchers soon hold different
//! pieces and trade them, instead of all waiting on the first holder.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bao_tree::ChunkNum;
use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointAddr};
use iroh_blobs::protocol::{ChunkRanges, GetRequest, ObserveRequest};
use iroh_blobs::Hash;
use rand::seq::SliceRandom;

use crate::manifest::Manifest;
use crate::progress::Progress;
use crate::store::ImageStore;
use crate::ImageError;

/// A node that holds the image.
#[derive(Clone, Debug)]
pub struct Holder {
    /// How reports name it (e.g. `n2`).
    pub label: String,
    pub addr: EndpointAddr,
}

/// What one holder contributed, or why it was dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HolderStats {
    pub label: String,
    pub pieces: u32,
    pub bytes: u64,
    pub error: Option<String>,
}

/// The outcome of a fetch.
#[derive(Clone, Debug)]
pub struct FetchReport {
    pub manifest: Manifest,
    /// NAR blobs that were missing here.
    pub fetched_blobs: u32,
    pub fetched_bytes: u64,
    pub holders: Vec<HolderStats>,
}

/// Blobs larger than twice this are fetched in pieces of this size, so several streams
/// and holders can serve one blob.
const PIECE_BYTES: u64 = 16 << 20;
/// BLAKE3 chunks are 1 KiB.
const CHUNK_BYTES: u64 = 1024;
/// How many holders serve one fetch at once.
const MAX_HOLDERS: usize = 8;
/// Concurrent requests to a holder: when it is the only one, and when it shares the work.
const STREAMS_ALONE: usize = 4;
const STREAMS_SHARED: usize = 2;
/// How many peers with part of a blob are asked (by two streams each).
const MAX_PEERS: usize = 8;
/// How long a worker with nothing to take waits before it looks again (a piece in flight
/// elsewhere may come back; a peer may have received more).
const IDLE_POLL: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
struct Piece {
    blob: Hash,
    /// Chunk range; `None` for the whole blob.
    chunks: Option<(u64, Option<u64>)>,
    bytes: u64,
    /// The blob's size in chunks (the end of an open-ended range).
    blob_chunks: u64,
}

impl Piece {
    /// The chunks this piece covers.
    fn ranges(&self) -> ChunkRanges {
        let (start, end) = match self.chunks {
            None => (0, self.blob_chunks),
            Some((start, end)) => (start, end.unwrap_or(self.blob_chunks)),
        };
        ChunkRanges::from(ChunkNum(start)..ChunkNum(end))
    }

    fn request(&self) -> GetRequest {
        match self.chunks {
            None => GetRequest::blob(self.blob),
            Some((start, Some(end))) => GetRequest::builder()
                .root(ChunkRanges::from(ChunkNum(start)..ChunkNum(end)))
                .build(self.blob),
            Some((start, None)) => GetRequest::builder()
                .root(ChunkRanges::from(ChunkNum(start)..))
                .build(self.blob),
        }
    }
}

fn pieces_of(blob: Hash, size: u64) -> Vec<Piece> {
    let total_chunks = size.div_ceil(CHUNK_BYTES);
    if size <= PIECE_BYTES * 2 {
        return vec![Piece {
            blob,
            chunks: None,
            bytes: size,
            blob_chunks: total_chunks,
        }];
    }
    let per = PIECE_BYTES / CHUNK_BYTES;
    let mut out = Vec::new();
    let mut start = 0;
    while start < total_chunks {
        let end = start + per;
        let last = end >= total_chunks;
        out.push(Piece {
            blob,
            // The last piece is open-ended, so it also proves the blob's size.
            chunks: Some((start, if last { None } else { Some(end) })),
            bytes: if last {
                size - start * CHUNK_BYTES
            } else {
                PIECE_BYTES
            },
            blob_chunks: total_chunks,
        });
        start = end;
    }
    out
}

/// Fetches the image `manifest_hash` into `store` from `holders` and keeps it, with help
/// from `peers` (other nodes that may hold part of it). Returns what came from where:
/// one entry per holder, then one per peer. Fails (naming every holder's reason) when the
/// holders and peers together could not deliver it; blobs and pieces already received are
/// kept for the next attempt.
pub async fn fetch(
    store: &ImageStore,
    endpoint: &Endpoint,
    manifest_hash: Hash,
    holders: Vec<Holder>,
    peers: Vec<Holder>,
    progress: &Progress,
) -> Result<FetchReport, ImageError> {
    let mut stats = fresh_stats(&holders);
    // Keep what arrives from garbage collection until the image is tagged.
    let _guard = store
        .blobs()
        .tags()
        .temp_tag(iroh_blobs::HashAndFormat::hash_seq(manifest_hash))
        .await
        .map_err(|e| ImageError::Blobs(e.to_string()))?;
    // 1. The hash sequence and the manifest, from the first holder that has them.
    let manifest = head(store, endpoint, manifest_hash, &holders, &mut stats).await?;
    let entries = manifest.check()?;

    // 2. The NARs this node lacks, as pieces, in this node's own order.
    let mut pieces = Vec::new();
    let mut large = Vec::new();
    let mut fetched_blobs = 0;
    let mut fetched_bytes = 0;
    let alive: Vec<usize> = (0..holders.len())
        .filter(|i| stats[*i].error.is_none())
        .collect();
    for e in &entries {
        if store.has_blob(e.blob).await? {
            continue;
        }
        fetched_blobs += 1;
        fetched_bytes += e.nar_size;
        let of = pieces_of(e.blob, e.nar_size);
        if of.len() > 1 {
            large.push(e.blob);
        }
        pieces.extend(of);
    }
    pieces.shuffle(&mut rand::rng());
    progress.start("fetching", fetched_bytes);
    let work = Arc::new(Work {
        queue: Mutex::new(pieces.into()),
        in_flight: AtomicUsize::new(0),
        holders_serving: AtomicUsize::new(0),
    });
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    // Several streams per holder keep a holder busy while each stream waits on its own
    // verification and writes.
    let per_holder = if alive.len() == 1 {
        STREAMS_ALONE
    } else {
        STREAMS_SHARED
    };
    for i in alive.into_iter().take(MAX_HOLDERS) {
        let conn = match connect(endpoint, &holders[i].addr).await {
            Ok(c) => c,
            Err(e) => {
                stats[i].error = Some(e.to_string());
                continue;
            }
        };
        let failed = Arc::new(AtomicBool::new(false));
        for _ in 0..per_holder {
            work.holders_serving.fetch_add(1, Ordering::SeqCst);
            let source = Source {
                store: store.clone(),
                conn: conn.clone(),
                work: work.clone(),
                progress: progress.clone(),
                failed: failed.clone(),
            };
            workers.spawn(async move {
                let mine = source.serve(None).await;
                source.work.holders_serving.fetch_sub(1, Ordering::SeqCst);
                (i, mine)
            });
        }
    }
    // Peers help with the large blobs, once there is a holder to fetch from at all.
    let mut peer_stats = fresh_stats(&peers);
    if !large.is_empty() && work.holders_serving.load(Ordering::SeqCst) > 0 {
        for (j, peer) in peers.iter().enumerate().take(MAX_PEERS) {
            // Connected in the background: a peer that does not answer delays nothing.
            let (store, endpoint, addr) = (store.clone(), endpoint.clone(), peer.addr.clone());
            let (work, progress, large) = (work.clone(), progress.clone(), large.clone());
            let index = holders.len() + j;
            workers.spawn(async move {
                let Ok(conn) = connect(&endpoint, &addr).await else {
                    return (index, HolderStats::default());
                };
                let has = Arc::new(Has::default());
                let mut watchers = tokio::task::JoinSet::new();
                for blob in large {
                    watchers.spawn(watch_peer(store.clone(), conn.clone(), blob, has.clone()));
                }
                let source = Source {
                    store,
                    conn,
                    work,
                    progress,
                    failed: Arc::new(AtomicBool::new(false)),
                };
                // Two streams, as to a holder that shares the work.
                let (a, b) = tokio::join!(
                    source.serve(Some(has.clone())),
                    source.serve(Some(has.clone()))
                );
                let mut mine = HolderStats::default();
                for s in [a, b] {
                    mine.pieces += s.pieces;
                    mine.bytes += s.bytes;
                    mine.error = mine.error.or(s.error);
                }
                watchers.abort_all();
                (index, mine)
            });
        }
    }
    while let Some(done) = workers.join_next().await {
        if let Ok((i, mine)) = done {
            let s = match stats.get_mut(i) {
                Some(s) => s,
                None => match peer_stats.get_mut(i - holders.len()) {
                    Some(s) => s,
                    None => continue,
                },
            };
            s.pieces += mine.pieces;
            s.bytes += mine.bytes;
            if mine.error.is_some() && s.error.is_none() {
                s.error = mine.error;
            }
        }
    }
    stats.extend(peer_stats);
    // 3. Every blob complete, or the reasons why not.
    let mut missing = Vec::new();
    for e in &entries {
        if !store.has_blob(e.blob).await? {
            missing.push(e.path.base_name());
        }
    }
    if !missing.is_empty() {
        return Err(ImageError::Fetch(failure_summary(
            &format!(
                "{} of {} store paths could not be fetched ({})",
                missing.len(),
                entries.len(),
                missing.join(", ")
            ),
            &stats,
        )));
    }
    if !store.is_complete(manifest_hash).await? {
        return Err(ImageError::Fetch(
            "the image is incomplete after the fetch".into(),
        ));
    }
    store.keep(manifest_hash, &manifest).await?;
    progress.finish();
    tracing::info!(
        %manifest_hash,
        bytes = fetched_bytes,
        ms = started.elapsed().as_millis() as u64,
        "fetched image"
    );
    Ok(FetchReport {
        manifest,
        fetched_blobs,
        fetched_bytes,
        holders: stats,
    })
}

/// The pieces still to fetch, shared by every stream of every source.
struct Work {
    queue: Mutex<VecDeque<Piece>>,
    /// Pieces taken and not yet done or given back.
    in_flight: AtomicUsize,
    /// Streams to complete holders still running.
    holders_serving: AtomicUsize,
}

impl Work {
    /// Takes the first piece `accept` allows.
    fn take(&self, accept: impl Fn(&Piece) -> bool) -> Option<Piece> {
        let mut q = self.queue.lock().ok()?;
        let i = q.iter().position(accept)?;
        let piece = q.remove(i)?;
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Some(piece)
    }

    fn done(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    fn give_back(&self, piece: Piece) {
        if let Ok(mut q) = self.queue.lock() {
            q.push_back(piece);
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Nothing left to take, and nothing out that could come back.
    fn finished(&self) -> bool {
        self.queue.lock().map_or(true, |q| q.is_empty())
            && self.in_flight.load(Ordering::SeqCst) == 0
    }
}

/// The chunks a peer is known to have, by blob, and a signal when that grows.
#[derive(Default)]
struct Has {
    ranges: Mutex<HashMap<Hash, ChunkRanges>>,
    grew: tokio::sync::Notify,
}

impl Has {
    fn covers(&self, piece: &Piece) -> bool {
        self.ranges.lock().is_ok_and(|r| {
            r.get(&piece.blob)
                .is_some_and(|have| piece.ranges().is_subset(have))
        })
    }
}

/// Follows what a peer holds of `blob` (its verified chunks) until aborted.
async fn watch_peer(store: ImageStore, conn: Connection, blob: Hash, has: Arc<Has>) {
    use n0_future::StreamExt;
    let mut updates = std::pin::pin!(store
        .blobs()
        .remote()
        .observe(conn, ObserveRequest::new(blob)));
    while let Some(Ok(update)) = updates.next().await {
        if let Ok(mut r) = has.ranges.lock() {
            let have = r.entry(blob).or_default();
            *have |= update.ranges;
        }
        has.grew.notify_waiters();
    }
}

/// One stream to one source: a complete holder, or a peer with part of the blobs.
struct Source {
    store: ImageStore,
    conn: Connection,
    work: Arc<Work>,
    progress: Progress,
    /// Set when any stream to this source failed: the source serves no more.
    failed: Arc<AtomicBool>,
}

impl Source {
    /// Takes pieces (for a peer, only those inside what it `has`) until none are left.
    /// A complete holder's stream also waits for pieces out elsewhere, which may come
    /// back; a peer's stream stops once no holder is left to fetch from and it has
    /// nothing more to offer.
    async fn serve(&self, has: Option<Arc<Has>>) -> HolderStats {
        let mut mine = HolderStats::default();
        while !self.failed.load(Ordering::Relaxed) {
            let piece = match &has {
                None => self.work.take(|_| true),
                Some(h) => self.work.take(|p| h.covers(p)),
            };
            let Some(piece) = piece else {
                if self.work.finished() {
                    break;
                }
                match &has {
                    None => tokio::time::sleep(IDLE_POLL).await,
                    Some(h) => {
                        if self.work.holders_serving.load(Ordering::SeqCst) == 0 {
                            break;
                        }
                        let _ = tokio::time::timeout(IDLE_POLL, h.grew.notified()).await;
                    }
                }
                continue;
            };
            match get_counted(&self.store, &self.conn, piece.request(), &self.progress).await {
                Ok(_) => {
                    self.work.done();
                    mine.pieces += 1;
                    mine.bytes += piece.bytes;
                }
                Err(e) => {
                    // What arrived was verified and is kept; the rest goes back, and this
                    // source serves no more.
                    self.work.give_back(piece);
                    self.failed.store(true, Ordering::Relaxed);
                    mine.error = Some(e.to_string());
                    break;
                }
            }
        }
        mine
    }
}

/// One empty report per holder, in the holders' order.
fn fresh_stats(holders: &[Holder]) -> Vec<HolderStats> {
    holders
        .iter()
        .map(|h| HolderStats {
            label: h.label.clone(),
            ..HolderStats::default()
        })
        .collect()
}

fn failure_summary(what: &str, stats: &[HolderStats]) -> String {
    let reasons: Vec<String> = stats
        .iter()
        .filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.label)))
        .collect();
    if reasons.is_empty() {
        format!("{what}: no holder is reachable")
    } else {
        format!("{what}: {}", reasons.join("; "))
    }
}

/// How long to wait for a holder to answer at all.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why one holder did not serve a request (it goes into that holder's stats).
#[derive(Debug, thiserror::Error)]
enum HolderError {
    #[error("cannot connect: {0}")]
    Connect(#[source] iroh::endpoint::ConnectError),
    #[error("no answer within {} s", CONNECT_TIMEOUT.as_secs())]
    NoAnswer,
    #[error("refused: this node may not fetch blobs from it")]
    Refused,
    /// The provider found its own copy corrupt (it re-hashes before sending).
    #[error("holder sent bad data or failed ({0})")]
    Failed(#[source] iroh_blobs::get::GetError),
    #[error("holder sent data that does not match the hash ({0})")]
    Mismatch(#[source] iroh_blobs::get::GetError),
    #[error("{0}")]
    Transfer(#[source] iroh_blobs::get::GetError),
    #[error("the transfer ended without an answer")]
    Ended,
}

impl From<iroh_blobs::get::GetError> for HolderError {
    fn from(e: iroh_blobs::get::GetError) -> Self {
        match e.iroh_error_code().map(u64::from) {
            Some(1) => Self::Refused,
            Some(3) => Self::Failed(e),
            _ if e.to_string().to_ascii_lowercase().contains("mismatch") => Self::Mismatch(e),
            _ => Self::Transfer(e),
        }
    }
}

async fn connect(endpoint: &Endpoint, addr: &EndpointAddr) -> Result<Connection, HolderError> {
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        endpoint.connect(addr.clone(), iroh_blobs::ALPN),
    )
    .await
    {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(HolderError::Connect(e)),
        Err(_) => Err(HolderError::NoAnswer),
    }
}

/// One request to one holder.
async fn get(
    store: &ImageStore,
    conn: &Connection,
    request: GetRequest,
) -> Result<u64, HolderError> {
    get_counted(store, conn, request, &Progress::none()).await
}

/// One request to one holder, advancing `progress` as payload bytes arrive. Returns the
/// bytes received.
async fn get_counted(
    store: &ImageStore,
    conn: &Connection,
    request: GetRequest,
    progress: &Progress,
) -> Result<u64, HolderError> {
    use iroh_blobs::api::remote::GetProgressItem;
    use n0_future::StreamExt;
    let mut items = store
        .blobs()
        .remote()
        .execute_get(conn.clone(), request)
        .stream();
    let mut seen = 0;
    while let Some(item) = items.next().await {
        match item {
            GetProgressItem::Progress(total) => {
                progress.advance(total.saturating_sub(seen));
                seen = seen.max(total);
            }
            GetProgressItem::Done(stats) => return Ok(stats.payload_bytes_read),
            GetProgressItem::Error(e) => return Err(e.into()),
        }
    }
    Err(HolderError::Ended)
}

/// Fetches only an image's hash sequence and manifest (for `image show` on a node that
/// does not hold the image).
pub async fn fetch_manifest(
    store: &ImageStore,
    endpoint: &Endpoint,
    manifest_hash: Hash,
    holders: &[Holder],
) -> Result<Manifest, ImageError> {
    if let Ok(m) = store.manifest(manifest_hash).await {
        return Ok(m);
    }
    let mut stats = fresh_stats(holders);
    head(store, endpoint, manifest_hash, holders, &mut stats).await
}

async fn head(
    store: &ImageStore,
    endpoint: &Endpoint,
    manifest_hash: Hash,
    holders: &[Holder],
    stats: &mut [HolderStats],
) -> Result<Manifest, ImageError> {
    let head = GetRequest::builder()
        .root(ChunkRanges::all())
        .child(0, ChunkRanges::all())
        .build(manifest_hash);
    for (i, h) in holders.iter().enumerate() {
        let got = match connect(endpoint, &h.addr).await {
            Ok(conn) => get(store, &conn, head.clone()).await,
            Err(e) => Err(e),
        };
        match got {
            Ok(_) => match store.manifest(manifest_hash).await {
                Ok(m) => return Ok(m),
                Err(e) => stats[i].error = Some(e.to_string()),
            },
            Err(e) => stats[i].error = Some(e.to_string()),
        }
    }
    Err(ImageError::Fetch(failure_summary(
        "could not get the manifest",
        stats,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn work(pieces: Vec<Piece>) -> Work {
        Work {
            queue: Mutex::new(pieces.into()),
            in_flight: AtomicUsize::new(0),
            holders_serving: AtomicUsize::new(0),
        }
    }

    fn has(blob: Hash, ranges: ChunkRanges) -> Has {
        let h = Has::default();
        h.ranges.lock().unwrap().insert(blob, ranges);
        h
    }

    #[test]
    fn pieces_cover_the_whole_blob_and_end_open() {
        let blob = Hash::new(b"nar");
        let size = 40 * MIB + 5;
        let pieces = pieces_of(blob, size);
        assert_eq!(pieces.len(), 3);
        assert_eq!(pieces.iter().map(|p| p.bytes).sum::<u64>(), size);
        let chunks = size.div_ceil(CHUNK_BYTES);
        let mut all = ChunkRanges::empty();
        for p in &pieces {
            all |= p.ranges();
        }
        assert_eq!(all, ChunkRanges::from(ChunkNum(0)..ChunkNum(chunks)));
        // The last is asked for open-ended (it proves the size), yet covers only the blob.
        assert_eq!(pieces[2].chunks, Some((2 * 16 * 1024, None)));
        assert_eq!(
            pieces[2].ranges(),
            ChunkRanges::from(ChunkNum(2 * 16 * 1024)..ChunkNum(chunks))
        );
        // A small blob is one piece, the whole of it.
        let small = pieces_of(blob, 3 * MIB);
        assert_eq!(small.len(), 1);
        assert_eq!(
            small[0].ranges(),
            ChunkRanges::from(ChunkNum(0)..ChunkNum(3 * 1024))
        );
    }

    #[test]
    fn a_peer_is_asked_only_for_pieces_inside_what_it_has() {
        let blob = Hash::new(b"nar");
        let other = Hash::new(b"other");
        let pieces = pieces_of(blob, 64 * MIB);
        // The peer has the second piece and half of the third.
        let peer = has(
            blob,
            ChunkRanges::from(ChunkNum(16 * 1024)..ChunkNum(40 * 1024)),
        );
        assert!(!peer.covers(&pieces[0]));
        assert!(peer.covers(&pieces[1]));
        assert!(!peer.covers(&pieces[2]));
        // Nothing of a blob it was not seen to have.
        assert!(!peer.covers(&pieces_of(other, 64 * MIB)[1]));
        let w = work(pieces);
        let taken = w.take(|p| peer.covers(p)).unwrap();
        assert_eq!(taken.chunks, Some((16 * 1024, Some(32 * 1024))));
        assert!(w.take(|p| peer.covers(p)).is_none());
        // What it has grows: now the third piece too.
        *peer.ranges.lock().unwrap().get_mut(&blob).unwrap() |=
            ChunkRanges::from(ChunkNum(32 * 1024)..ChunkNum(48 * 1024));
        assert_eq!(
            w.take(|p| peer.covers(p)).unwrap().chunks,
            Some((32 * 1024, Some(48 * 1024)))
        );
    }

    #[test]
    fn the_work_is_finished_only_when_nothing_is_out_that_could_come_back() {
        let blob = Hash::new(b"nar");
        let w = work(pieces_of(blob, 3 * MIB));
        assert!(!w.finished());
        let piece = w.take(|_| true).unwrap();
        // The queue is empty but a piece is out: not finished.
        assert!(w.take(|_| true).is_none());
        assert!(!w.finished());
        // It failed and came back: another source takes it.
        w.give_back(piece);
        assert!(!w.finished());
        let again = w.take(|_| true).unwrap();
        assert_eq!(again.blob, blob);
        w.done();
        assert!(w.finished());
    }
}
