//! Fetching an image from the nodes that hold it.
//!
//! The hash sequence and the manifest come from the first holder that answers. The NARs
//! this node lacks are cut into pieces (whole blobs, and 16 MiB ranges of large blobs) and
//! pulled from a shared queue by a few concurrent streams per holder, so several holders
//! (and several streams of one) serve at once. Every byte is checked against the BLAKE3 tree of the
//! blob it belongs to as it arrives; a holder that sends anything else, or vanishes, is
//! dropped with its reason and its piece goes back in the queue for the others.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bao_tree::ChunkNum;
use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointAddr};
use iroh_blobs::protocol::{ChunkRanges, GetRequest};
use iroh_blobs::Hash;

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

#[derive(Clone, Debug)]
struct Piece {
    blob: Hash,
    /// Chunk range; `None` for the whole blob.
    chunks: Option<(u64, Option<u64>)>,
    bytes: u64,
}

impl Piece {
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
    if size <= PIECE_BYTES * 2 {
        return vec![Piece {
            blob,
            chunks: None,
            bytes: size,
        }];
    }
    let per = PIECE_BYTES / CHUNK_BYTES;
    let total_chunks = size.div_ceil(CHUNK_BYTES);
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
        });
        start = end;
    }
    out
}

/// Fetches the image `manifest_hash` into `store` from `holders` and keeps it. Returns
/// what came from where. Fails (naming every holder's reason) when the holders together
/// could not deliver it; blobs already received are kept for the next attempt.
pub async fn fetch(
    store: &ImageStore,
    endpoint: &Endpoint,
    manifest_hash: Hash,
    holders: Vec<Holder>,
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

    // 2. The NARs this node lacks, as pieces.
    let mut queue = VecDeque::new();
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
        queue.extend(pieces_of(e.blob, e.nar_size));
    }
    progress.start("fetching", fetched_bytes);
    let queue = Arc::new(Mutex::new(queue));
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
                stats[i].error = Some(e);
                continue;
            }
        };
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for _ in 0..per_holder {
            let (store, conn, queue, progress, failed) = (
                store.clone(),
                conn.clone(),
                queue.clone(),
                progress.clone(),
                failed.clone(),
            );
            workers.spawn(async move {
                let mut mine = HolderStats::default();
                while !failed.load(std::sync::atomic::Ordering::Relaxed) {
                    let piece = match queue.lock() {
                        Ok(mut q) => q.pop_front(),
                        Err(_) => None,
                    };
                    let Some(piece) = piece else { break };
                    match get_counted(&store, &conn, piece.request(), &progress).await {
                        Ok(_) => {
                            mine.pieces += 1;
                            mine.bytes += piece.bytes;
                        }
                        Err(e) => {
                            // What arrived was verified and is kept; the rest goes back,
                            // and this holder serves no more.
                            if let Ok(mut q) = queue.lock() {
                                q.push_back(piece);
                            }
                            failed.store(true, std::sync::atomic::Ordering::Relaxed);
                            mine.error = Some(e);
                            break;
                        }
                    }
                }
                (i, mine)
            });
        }
    }
    while let Some(done) = workers.join_next().await {
        if let Ok((i, mine)) = done {
            stats[i].pieces += mine.pieces;
            stats[i].bytes += mine.bytes;
            if mine.error.is_some() && stats[i].error.is_none() {
                stats[i].error = mine.error;
            }
        }
    }
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

async fn connect(endpoint: &Endpoint, addr: &EndpointAddr) -> Result<Connection, String> {
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        endpoint.connect(addr.clone(), iroh_blobs::ALPN),
    )
    .await
    {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(format!("cannot connect: {e}")),
        Err(_) => Err(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs())),
    }
}

/// One request to one holder.
async fn get(store: &ImageStore, conn: &Connection, request: GetRequest) -> Result<u64, String> {
    get_counted(store, conn, request, &Progress::none()).await
}

/// One request to one holder, advancing `progress` as payload bytes arrive. Returns the
/// bytes received.
async fn get_counted(
    store: &ImageStore,
    conn: &Connection,
    request: GetRequest,
    progress: &Progress,
) -> Result<u64, String> {
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
            GetProgressItem::Error(e) => return Err(describe(&e)),
        }
    }
    Err("the transfer ended without an answer".into())
}

fn describe(e: &iroh_blobs::get::GetError) -> String {
    let text = e.to_string();
    match e.iroh_error_code().map(u64::from) {
        Some(1) => "refused: this node may not fetch blobs from it".into(),
        // The provider found its own copy corrupt (it re-hashes before sending).
        Some(3) => format!("holder sent bad data or failed ({text})"),
        _ if text.contains("Mismatch") || text.contains("mismatch") => {
            format!("holder sent data that does not match the hash ({text})")
        }
        _ => text,
    }
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
            Err(e) => stats[i].error = Some(e),
        }
    }
    Err(ImageError::Fetch(failure_summary(
        "could not get the manifest",
        stats,
    )))
}
