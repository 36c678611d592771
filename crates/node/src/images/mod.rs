//! The node's images: importing, pulling from holders (and recording this node as one),
//! putting closures into the host's store, the binary cache's signing key, and the janitor
//! that keeps the local blob store in line with cluster state. The `image …` requests
//! that use this are in `api::images`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blixard_core::{BlobHash, Command, Image, MemberStatus, NodeId, State};
use blixard_images::nix::SigningKey;
use blixard_images::{fetch, Holder, ImageError, ImageStore, Progress};
use blixard_net::api::{ApiError, HolderReport, ImagePulled, ProgressSink, PHASE_HELD};
use blixard_raft::RaftNode;
use iroh_blobs::Hash;
use rand::seq::SliceRandom;

use crate::cluster::{member_addr_of, now_ms, ClusterHandle};
use crate::gate::Gate;

/// How long one raft step (a proposal, a read barrier) may take inside a long request.
const RAFT_STEP: Duration = Duration::from_secs(15);
/// How long one attempt at it waits before it is made again.
const RAFT_ATTEMPT: Duration = Duration::from_secs(3);

/// Runs an idempotent raft step until it answers, for at most `total`. An attempt that
/// found no leader (an election, e.g. while transfers starve the host's CPU) is made again
/// after a pause, and so is one unanswered after `attempt`: a proposal a follower forwards
/// to the leader is lost, unlike appends, when the stream to the leader breaks or its
/// queue is full, and nothing in raft sends it again. Only for steps that may be applied
/// twice (adding a holder, a read barrier), so that the lost attempt that was in fact
/// committed does no harm.
async fn retried<T, F: std::future::Future<Output = Result<T, ApiError>>>(
    total: Duration,
    attempt: Duration,
    mut step: impl FnMut() -> F,
) -> Result<T, ApiError> {
    let deadline = tokio::time::Instant::now() + total;
    let pause = Duration::from_millis(250);
    loop {
        let this = (tokio::time::Instant::now() + attempt).min(deadline);
        match tokio::time::timeout_at(this, step()).await {
            Err(_) if this < deadline => {
                tracing::info!("a raft step got no answer within {attempt:?}; trying again");
            }
            Err(_) => return Err(ApiError::Timeout(total.as_millis() as u64)),
            Ok(Err(
                ApiError::NoLeader | ApiError::Unavailable(_) | ApiError::OutcomeUnknown(_),
            )) if tokio::time::Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
            }
            Ok(result) => return result,
        }
    }
}

/// The node's images and when each was last used here (for eviction).
pub struct Images {
    pub cluster: Arc<ClusterHandle>,
    /// Where this node's own changes (the images it holds) are authorized and audited.
    pub gate: Arc<Gate>,
    pub store: ImageStore,
    /// `http://ADDR` of this node's binary cache, when it serves one.
    pub cache_url: Option<String>,
    /// Evict unpinned images beyond this many bytes; `None` keeps everything.
    pub cache_bytes: Option<u64>,
    /// Copy fetched closures into a Nix store with `nix copy` instead of unpacking them:
    /// `Some(None)` for the host's store, `Some(Some(uri))` for another one.
    pub nix_copy: Option<Option<String>>,
    /// Where callers other than the node's admin credential may import from.
    pub import_paths: Vec<PathBuf>,
    last_used: Mutex<HashMap<BlobHash, Instant>>,
    metrics: crate::metrics::ImageMetrics,
    /// Held shared by each import from its start until cluster state records the image,
    /// and exclusively by the janitor while it drops the copies of images the cluster
    /// does not know: an image being imported is tagged in the blob store before it is
    /// recorded, and must not be taken for a removed one.
    importing: tokio::sync::RwLock<()>,
    /// How often the janitor runs.
    pub janitor_interval: Duration,
}

impl Images {
    pub fn new(
        gate: Arc<Gate>,
        store: ImageStore,
        cache_url: Option<String>,
        cache_bytes: Option<u64>,
        nix_copy: Option<Option<String>>,
        import_paths: Vec<PathBuf>,
    ) -> Self {
        Self {
            cluster: gate.cluster.clone(),
            gate,
            store,
            cache_url,
            cache_bytes,
            nix_copy,
            import_paths,
            last_used: Mutex::new(HashMap::new()),
            metrics: Default::default(),
            importing: tokio::sync::RwLock::new(()),
            janitor_interval: Duration::from_secs(3),
        }
    }

    /// Runs the janitor every `every`.
    pub fn janitor_every(mut self, every: Duration) -> Self {
        self.janitor_interval = every;
        self
    }

    /// Counts pulls in `metrics`.
    pub fn counting(mut self, metrics: crate::metrics::ImageMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    fn touch(&self, manifest: BlobHash) {
        if let Ok(mut m) = self.last_used.lock() {
            m.insert(manifest, Instant::now());
        }
    }
}

pub fn blob_hash(h: BlobHash) -> Hash {
    Hash::from_bytes(h.0)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// The binary cache reads the signing key from cluster state.
pub struct StateKeys(pub RaftNode);

impl blixard_images::cache::KeySource for StateKeys {
    fn signing_key(&self) -> Option<SigningKey> {
        cluster_signing_key(&self.0)
    }
}

/// The cluster's cache signing key, once the first import has set it.
fn cluster_signing_key(node: &RaftNode) -> Option<SigningKey> {
    let secret = node.state().cache_key().cloned()?;
    SigningKey::from_nix_secret(&secret)
        .map_err(|e| tracing::error!("the cluster's cache key is unreadable: {e}"))
        .ok()
}

/// Member `id` as a source to fetch from, if its address is known.
fn source(state: &State, id: NodeId) -> Option<(NodeId, Holder)> {
    let addr = member_addr_of(state, id)?;
    Some((
        id,
        Holder {
            label: format!("n{id}"),
            addr,
        },
    ))
}

impl Images {
    pub fn holders_of(&self, image: &Image) -> Vec<(NodeId, Holder)> {
        let me = self.cluster.me();
        let state = self.cluster.state();
        let mut holders: Vec<(NodeId, Holder)> = image
            .holders
            .iter()
            .filter(|n| **n != me)
            .filter_map(|n| source(&state, *n))
            .collect();
        // Holders the leader has marked down are asked only when no other is up: each
        // would hold up the pieces it was given until it is dropped.
        if holders.iter().any(|(n, _)| state.down_since(*n).is_none()) {
            holders.retain(|(n, _)| state.down_since(*n).is_none());
        }
        // Spread the load: every fetcher starts with a different holder.
        holders.shuffle(&mut rand::rng());
        holders
    }

    /// The other members that do not hold `image` completely: some may hold part of it
    /// (fetching it right now) and can serve those pieces. Shuffled, like the holders.
    fn peers_for(&self, image: &Image) -> Vec<(NodeId, Holder)> {
        let me = self.cluster.me();
        let state = self.cluster.state();
        let mut peers: Vec<(NodeId, Holder)> = state
            .members()
            .filter(|m| m.id != me && !image.holders.contains(&m.id))
            .filter(|m| m.status == MemberStatus::Active && state.down_since(m.id).is_none())
            .filter_map(|m| source(&state, m.id))
            .collect();
        peers.shuffle(&mut rand::rng());
        peers
    }

    pub fn image_named(&self, name: &str) -> Result<Image, ApiError> {
        self.cluster
            .state()
            .image(name)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("no image {name}")))
    }

    /// Sets the cluster's cache signing key if no node has yet.
    async fn ensure_cache_key(&self) -> Result<(), ApiError> {
        if self.cluster.state().cache_key().is_some() {
            return Ok(());
        }
        let key = SigningKey::generate(&format!("blixard-{}-1", self.cluster_short()))
            .map_err(internal)?;
        let command = Command::SetCacheKey {
            secret: key.to_nix_secret(),
        };
        self.bounded(|| self.cluster.propose(command.clone()))
            .await
            .map(|_| ())
    }

    /// Raft steps inside long-running requests get the usual bound, not the request's
    /// hour. See [`retried`]: only for steps that may be applied twice.
    pub(crate) async fn bounded<T, F: std::future::Future<Output = Result<T, ApiError>>>(
        &self,
        step: impl FnMut() -> F,
    ) -> Result<T, ApiError> {
        retried(RAFT_STEP, RAFT_ATTEMPT, step).await
    }

    fn cluster_short(&self) -> String {
        self.cluster
            .cluster_id
            .to_string()
            .chars()
            .take(8)
            .collect()
    }

    /// Imports the closure (or directory) at `path` as image `name`: into the blob store,
    /// into this host's store, and into cluster state with this node as its holder. The
    /// caller has checked the name and whether its caller may read `path`.
    pub async fn import(
        &self,
        name: &str,
        path: &Path,
        tenant: Option<String>,
        pinned: bool,
        sink: ProgressSink,
    ) -> Result<Image, ApiError> {
        // An image that no node holds any more (its holders were lost: a restore, a forced
        // new cluster) may be imported again: the same closure makes this node its holder;
        // another closure is refused when it is registered.
        if let Some(existing) = self
            .cluster
            .state()
            .image(name)
            .filter(|i| !i.holders.is_empty())
        {
            return Err(ApiError::Rejected(format!(
                "image {name} already exists (root {}); remove it first or pick another name",
                existing.root
            )));
        }
        // Until the image is recorded below, its tagged blobs are known to no one else.
        let _importing = self.importing.read().await;
        self.ensure_cache_key().await?;
        let progress = Progress::new(move |p| sink.report(p.phase, p.done, p.total));
        let started = Instant::now();
        let imported = self
            .store
            .import(path, name, &progress)
            .await
            .map_err(|e| ApiError::Rejected(e.to_string()))?;
        let m = &imported.manifest;
        let manifest = BlobHash(*imported.manifest_hash.as_bytes());
        let image = Image {
            name: name.to_string(),
            manifest,
            root: m.root.clone(),
            store_dir: m.store_dir.clone(),
            nar_count: m.entries.len() as u32,
            nar_size: m.total_size(),
            holders: [self.cluster.me()].into(),
            pinned,
            tenant,
            created_at_ms: now_ms(),
        };
        // Into this node's store too, so a VM here can run it.
        self.materialise_here(&image, m).await?;
        self.bounded(|| self.cluster.propose(Command::AddImage(image.clone())))
            .await?;
        self.touch(manifest);
        tracing::info!(
            image = %name,
            root = %m.root,
            paths = m.entries.len(),
            bytes = m.total_size(),
            ms = started.elapsed().as_millis() as u64,
            "imported image"
        );
        Ok(image)
    }

    /// Pins (never evicted, not removable) or unpins an image.
    pub async fn pin(&self, name: &str, pinned: bool) -> Result<Image, ApiError> {
        self.cluster
            .propose(Command::PinImage {
                name: name.to_string(),
                pinned,
            })
            .await?;
        self.image_named(name)
    }

    /// Removes an image from the cluster and drops this node's copy (the others drop
    /// theirs when their janitor sees it gone).
    pub async fn remove(&self, name: &str) -> Result<(), ApiError> {
        let image = self.image_named(name)?;
        self.cluster
            .propose(Command::RemoveImage {
                name: name.to_string(),
            })
            .await?;
        if let Err(e) = self.store.forget(blob_hash(image.manifest)).await {
            tracing::warn!(image = %name, "dropping the local copy: {e}");
        }
        Ok(())
    }

    /// The cluster's cache public key (once an import has made one), for Nix's
    /// trusted-public-keys.
    pub fn cache_public_key(&self) -> Option<String> {
        cluster_signing_key(&self.cluster.node).map(|k| k.public_key().to_string())
    }

    /// Fetches `image` from its holders (unless it is here), records this node as a
    /// holder, and unpacks it into the store dir.
    pub async fn pull_here(
        &self,
        image: &Image,
        sink: ProgressSink,
    ) -> Result<ImagePulled, ApiError> {
        let me = self.cluster.me();
        let started = Instant::now();
        let hash = blob_hash(image.manifest);
        let mut out = ImagePulled {
            node: me,
            fetched_blobs: 0,
            fetched_bytes: 0,
            holders: Vec::new(),
            materialised: Vec::new(),
            fetch_millis: 0,
            millis: 0,
        };
        let store = &self.store;
        let held = sink.clone();
        let mut fetch_took = None;
        if !store.is_complete(hash).await.map_err(internal)? {
            let holders = self.holders_of(image);
            if holders.is_empty() {
                return Err(ApiError::Rejected(format!(
                    "no other node holds image {} completely",
                    image.name
                )));
            }
            let peers = self.peers_for(image);
            let ids: Vec<NodeId> = holders.iter().chain(&peers).map(|(n, _)| *n).collect();
            let holder_count = holders.len();
            let progress = Progress::new(move |p| sink.report(p.phase, p.done, p.total));
            let report = fetch(
                store,
                self.cluster.client.endpoint(),
                hash,
                holders.into_iter().map(|(_, h)| h).collect(),
                peers.into_iter().map(|(_, h)| h).collect(),
                &progress,
            )
            .await
            .map_err(|e| ApiError::Unavailable(format!("image {}: {e}", image.name)))?;
            out.fetched_blobs = report.fetched_blobs;
            out.fetched_bytes = report.fetched_bytes;
            // Every holder; a peer only when it served something.
            out.holders = ids
                .into_iter()
                .zip(report.holders)
                .enumerate()
                .filter(|(i, (_, s))| *i < holder_count || s.pieces > 0)
                .map(|(_, (node, s))| HolderReport {
                    node,
                    blobs: s.pieces,
                    bytes: s.bytes,
                    error: s.error,
                })
                .collect();
            out.fetch_millis = started.elapsed().as_millis() as u64;
            fetch_took = Some(started.elapsed());
            for h in &out.holders {
                if let Some(e) = &h.error {
                    tracing::warn!(image = %image.name, holder = %h.node, "dropped holder: {e}");
                }
            }
        }
        // A holder is a node with every blob: it serves others from now on, while it
        // unpacks (the CLI's delivery starts the next puller on this report).
        if !image.holders.contains(&me) {
            let command = Command::SetImageHolder {
                name: image.name.clone(),
                manifest: image.manifest,
                node: me,
                held: true,
            };
            self.bounded(|| self.gate.propose_as_host(command.clone()))
                .await?;
        }
        held.report(PHASE_HELD, 1, 1);
        self.metrics
            .pulled(image.nar_size, out.fetched_bytes, fetch_took);
        let manifest = store.manifest(hash).await.map_err(internal)?;
        out.materialised = self.materialise_here(image, &manifest).await?;
        self.touch(image.manifest);
        out.millis = started.elapsed().as_millis() as u64;
        Ok(out)
    }

    /// Puts the image's store paths into this host's store: unpacked, or through Nix.
    async fn materialise_here(
        &self,
        image: &Image,
        manifest: &blixard_images::Manifest,
    ) -> Result<Vec<String>, ApiError> {
        match &self.nix_copy {
            None => self
                .store
                .materialise(manifest)
                .await
                .map_err(|e| ApiError::Rejected(format!("image {}: {e}", image.name))),
            Some(to) => {
                self.nix_copy(image, to.as_deref()).await?;
                Ok(vec![image.root.clone()])
            }
        }
    }

    /// Hands an image to the host's Nix through this node's binary cache, so Nix checks
    /// the signatures, registers the paths and its GC roots can protect them.
    async fn nix_copy(&self, image: &Image, to: Option<&str>) -> Result<(), ApiError> {
        let url = self.cache_url.clone().ok_or_else(|| {
            ApiError::Rejected(
                "materialise = nix needs the binary cache (images.cache_listen)".into(),
            )
        })?;
        let key = cluster_signing_key(&self.cluster.node)
            .map(|k| k.public_key().to_string())
            .ok_or_else(|| ApiError::Rejected("the cluster has no cache key".into()))?;
        let mut cmd = tokio::process::Command::new("nix");
        cmd.args([
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--from",
            &url,
        ])
        .args(["--option", "extra-trusted-public-keys", &key])
        .args(["--option", "narinfo-cache-negative-ttl", "0"]);
        if let Some(to) = to {
            cmd.args(["--to", to]);
        }
        let out = cmd
            .arg(&image.root)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| ApiError::Rejected(format!("cannot run nix copy: {e}")))?;
        if !out.status.success() {
            return Err(ApiError::Rejected(format!(
                "image {}: nix copy --from {url}: {}",
                image.name,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// One round of housekeeping: drop local copies of images the cluster no longer has,
    /// stop claiming images this node lost, and evict least-recently-used unpinned images
    /// beyond the cache size.
    pub async fn janitor_round(&self) -> Result<(), JanitorError> {
        let me = self.cluster.me();
        let store = &self.store;
        // Held first, then the state: an image recorded in between is known.
        let held = match self.importing.try_write() {
            Ok(no_imports) => Some((no_imports, store.held().await?)),
            Err(_) => {
                tracing::debug!(
                    "image janitor: an import is under way; removed images are dropped next round"
                );
                None
            }
        };
        let images: Vec<Image> = self.cluster.state().images().cloned().collect();
        if let Some((_no_imports, held)) = held {
            for hash in &held {
                let known = images.iter().any(|i| blob_hash(i.manifest) == *hash);
                if !known {
                    tracing::info!(%hash, "dropping the blobs of a removed image");
                    store.forget(*hash).await?;
                }
            }
        }
        for image in images.iter().filter(|i| i.holders.contains(&me)) {
            let hash = blob_hash(image.manifest);
            if !store.is_complete(hash).await? {
                tracing::warn!(image = %image.name, "this node lost its copy; no longer a holder");
                self.set_holder(image, false).await?;
            }
        }
        let Some(limit) = self.cache_bytes else {
            return Ok(());
        };
        let mut mine: Vec<&Image> = images.iter().filter(|i| i.holders.contains(&me)).collect();
        let mut total: u64 = mine.iter().map(|i| i.nar_size).sum();
        if total <= limit {
            return Ok(());
        }
        let last_used = self.last_used.lock().map(|m| m.clone()).unwrap_or_default();
        // Oldest first; never seen used since this daemon started counts as oldest.
        mine.sort_by_key(|i| last_used.get(&i.manifest).copied());
        for image in mine {
            if total <= limit {
                break;
            }
            if image.pinned {
                continue;
            }
            // The last holder keeps its copy: evicting it would lose the image.
            if image.holders.len() <= 1 {
                continue;
            }
            tracing::info!(image = %image.name, bytes = image.nar_size, "evicting");
            self.set_holder(image, false).await?;
            store.forget(blob_hash(image.manifest)).await?;
            total = total.saturating_sub(image.nar_size);
        }
        Ok(())
    }

    async fn set_holder(&self, image: &Image, held: bool) -> Result<(), ApiError> {
        self.gate
            .propose_as_host(Command::SetImageHolder {
                name: image.name.clone(),
                manifest: image.manifest,
                node: self.cluster.me(),
                held,
            })
            .await
            .map(|_| ())
    }
}

/// Why a janitor round stopped early (the next round tries again).
#[derive(Debug, thiserror::Error)]
pub enum JanitorError {
    #[error("image store: {0}")]
    Store(#[from] ImageError),
    #[error("recording a holder: {0}")]
    Holder(#[from] ApiError),
}

/// Runs the janitor every few seconds until the node stops.
pub async fn janitor(images: Arc<Images>) {
    // `interval` refuses a zero period; the config allows 10 ms at least.
    let every = images.janitor_interval.max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if let Err(e) = images.janitor_round().await {
            tracing::debug!("image janitor: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A step whose first `lost` attempts never answer (a forwarded proposal that was
    /// dropped), then answers with its attempt number.
    fn step_losing(
        lost: u32,
        tries: &AtomicU32,
    ) -> impl FnMut() -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<u32, ApiError>> + Send>,
    > + '_ {
        move || {
            let n = tries.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move {
                if n <= lost {
                    std::future::pending::<()>().await;
                }
                Ok(n)
            })
        }
    }

    #[tokio::test]
    async fn an_unanswered_attempt_is_made_again() {
        let tries = AtomicU32::new(0);
        let got = retried(5000 * MS, 20 * MS, step_losing(2, &tries)).await;
        assert_eq!(got.unwrap(), 3);
    }

    #[tokio::test]
    async fn a_step_that_never_answers_times_out_with_the_whole_bound() {
        let tries = AtomicU32::new(0);
        let got = retried(200 * MS, 20 * MS, step_losing(u32::MAX, &tries)).await;
        assert_eq!(got.unwrap_err(), ApiError::Timeout(200));
        assert!(tries.load(Ordering::SeqCst) >= 2);
    }

    #[tokio::test]
    async fn no_leader_is_tried_again_and_refusals_are_not() {
        let tries = AtomicU32::new(0);
        let got = retried(5000 * MS, 1000 * MS, || {
            let n = tries.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                match n {
                    1 => Err(ApiError::NoLeader),
                    2 => Err(ApiError::Rejected("no image web".into())),
                    _ => Ok(n),
                }
            }
        })
        .await;
        assert_eq!(got.unwrap_err(), ApiError::Rejected("no image web".into()));
        assert_eq!(tries.load(Ordering::SeqCst), 2);
    }
}
