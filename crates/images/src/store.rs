//! The node's image store: an iroh-blobs store of NARs and manifests, and the store dir the
//! closures are unpacked into.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use iroh_blobs::api::TempTag;
use iroh_blobs::hashseq::HashSeq;
use iroh_blobs::store::fs::options::PathOptions;
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::{BlobFormat, Hash, HashAndFormat};

use crate::manifest::{CheckedEntry, Entry, Manifest, MANIFEST_VERSION};
use crate::nix::{
    dump_path, make_source_path, parse_path_info_json, unpack_nar, NarHash, StoreDir, StorePath,
    UnpackPolicy,
};
use crate::progress::Progress;
use crate::ImageError;

/// Tags that keep an image's blobs: `image/<manifest hash>`.
const TAG_PREFIX: &str = "image/";

/// Where a store path of a locally held image lives, for the binary cache.
#[derive(Clone, Debug)]
pub struct CachedPath {
    pub entry: CheckedEntry,
    pub store_dir: StoreDir,
}

/// The node's images.
#[derive(Clone, Debug)]
pub struct ImageStore {
    blobs: FsStore,
    /// Unpacked closures go here.
    store_dir: StoreDir,
    /// Scratch space for NARs being written or read (same file system as the blob store).
    stage: PathBuf,
    /// Store paths of complete local images by hash part: what the binary cache serves.
    index: Arc<RwLock<Index>>,
    /// Where the blob store keeps each blob's bytes (iroh-blobs' own path scheme).
    paths: PathOptions,
}

fn blob_err(what: &str) -> impl Fn(String) -> ImageError + '_ {
    move |e| ImageError::Blobs(format!("{what}: {e}"))
}

/// What an import produced.
#[derive(Clone, Debug)]
pub struct Imported {
    pub manifest_hash: Hash,
    pub manifest: Manifest,
}

impl ImageStore {
    /// Opens (or creates) the blob store under `dir`. `store_dir` is where closures are
    /// unpacked.
    pub async fn open(dir: &Path, store_dir: StoreDir) -> Result<Self, ImageError> {
        let stage = dir.join("stage");
        std::fs::create_dir_all(&stage).map_err(|e| ImageError::Io(stage.clone(), e))?;
        // Leftovers of an interrupted import are garbage.
        if let Ok(entries) = std::fs::read_dir(&stage) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        // Garbage collection removes the blobs of forgotten images; imports and fetches
        // in flight hold temporary tags.
        let mut options = iroh_blobs::store::fs::options::Options::new(dir);
        options.gc = Some(iroh_blobs::store::GcConfig {
            interval: std::time::Duration::from_secs(60),
            add_protected: None,
        });
        let paths = options.path.clone();
        let blobs = FsStore::load_with_opts(dir.join("blobs.db"), options)
            .await
            .map_err(|e| ImageError::Blobs(format!("cannot open {}: {e}", dir.display())))?;
        let store = Self {
            blobs,
            store_dir,
            stage,
            index: Arc::new(RwLock::new(Index::default())),
            paths,
        };
        store.reindex().await?;
        Ok(store)
    }

    pub fn blobs(&self) -> &FsStore {
        &self.blobs
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    /// Flushes and closes the blob store.
    pub async fn shutdown(&self) {
        if let Err(e) = self.blobs.shutdown().await {
            tracing::warn!("closing the blob store: {e}");
        }
    }

    /// The manifests of every image this node holds completely.
    pub async fn held(&self) -> Result<Vec<Hash>, ImageError> {
        use n0_future::StreamExt;
        let mut out = Vec::new();
        let mut tags = self
            .blobs
            .tags()
            .list_prefix(TAG_PREFIX)
            .await
            .map_err(|e| blob_err("listing tags")(e.to_string()))?;
        while let Some(tag) = tags.next().await {
            let tag = tag.map_err(|e| blob_err("listing tags")(e.to_string()))?;
            out.push(tag.hash);
        }
        Ok(out)
    }

    /// Rebuilds the binary-cache index from the complete local images.
    pub async fn reindex(&self) -> Result<(), ImageError> {
        let mut index = Index::default();
        for hash in self.held().await? {
            if !self.is_complete(hash).await? {
                continue;
            }
            match self.manifest(hash).await {
                Ok(m) => add_to_index(&mut index, &m)?,
                Err(e) => tracing::warn!(%hash, "unreadable manifest: {e}"),
            }
        }
        if let Ok(mut i) = self.index.write() {
            *i = index;
        }
        Ok(())
    }

    /// Looks up a store path by its hash part, for the binary cache.
    pub fn cached(&self, hash_part: &str) -> Option<CachedPath> {
        self.index.read().ok()?.by_hash_part.get(hash_part).cloned()
    }

    /// Looks up a store path by its NAR's blob, for the binary cache.
    pub fn cached_by_blob(&self, blob: &Hash) -> Option<CachedPath> {
        let index = self.index.read().ok()?;
        let hash_part = index.by_blob.get(blob)?;
        index.by_hash_part.get(hash_part).cloned()
    }

    /// The file holding a complete blob's bytes, opened for reading, if the blob store
    /// keeps them in one (not blobs small enough to live in its database) and the file
    /// is `size` bytes long. Reading it directly spares the store's export, which hands
    /// out 1 KiB at a time. The caller knows the blob is complete (a held image's), so
    /// the file is whole and no longer written; a blob collected since is simply not
    /// found, and the caller falls back to the store.
    pub fn blob_file(&self, blob: &Hash, size: u64) -> Option<std::fs::File> {
        let path = self.paths.data_path(blob);
        let file = std::fs::File::open(&path).ok()?;
        match file.metadata() {
            Ok(m) if m.is_file() && m.len() == size => Some(file),
            Ok(m) => {
                tracing::debug!(path = %path.display(), len = m.len(), size, "blob file of another size; reading through the store");
                None
            }
            Err(_) => None,
        }
    }

    /// Whether the image's hash sequence and every blob it lists are here.
    pub async fn is_complete(&self, manifest: Hash) -> Result<bool, ImageError> {
        self.local_complete(HashAndFormat::hash_seq(manifest)).await
    }

    /// Whether a blob is here completely.
    pub async fn has_blob(&self, hash: Hash) -> Result<bool, ImageError> {
        self.local_complete(HashAndFormat::raw(hash)).await
    }

    async fn local_complete(&self, content: HashAndFormat) -> Result<bool, ImageError> {
        let info = self
            .blobs
            .remote()
            .local(content)
            .await
            .map_err(|e| blob_err("checking local blobs")(e.to_string()))?;
        Ok(info.is_complete())
    }

    /// Reads an image's manifest from the local store (the sequence and manifest blob
    /// must be here).
    pub async fn manifest(&self, manifest: Hash) -> Result<Manifest, ImageError> {
        let seq = self
            .blobs
            .get_bytes(manifest)
            .await
            .map_err(|e| blob_err("reading the hash sequence")(e.to_string()))?;
        let seq = HashSeq::try_from(seq)
            .map_err(|e| ImageError::Manifest(format!("not a hash sequence: {e}")))?;
        let hashes: Vec<Hash> = seq.iter().collect();
        let Some((first, rest)) = hashes.split_first() else {
            return Err(ImageError::Manifest("empty hash sequence".into()));
        };
        let bytes = self
            .blobs
            .get_bytes(*first)
            .await
            .map_err(|e| blob_err("reading the manifest")(e.to_string()))?;
        Manifest::parse(&bytes, rest)
    }

    /// Imports `path`: a store path in `/nix/store` (or this node's store dir) with its
    /// closure as Nix knows it, or else a plain directory wrapped as one store path named
    /// `name` in this node's store dir.
    pub async fn import(
        &self,
        path: &Path,
        name: &str,
        progress: &Progress,
    ) -> Result<Imported, ImageError> {
        // `./result` and other links into the store name the path they point to.
        let path = &tokio::fs::canonicalize(path)
            .await
            .map_err(|e| ImageError::Io(path.to_owned(), e))?;
        let meta = tokio::fs::symlink_metadata(path)
            .await
            .map_err(|e| ImageError::Io(path.to_owned(), e))?;
        let nix_store = nix_store_of(path);
        let (store_dir, infos) = match &nix_store {
            Some(dir) => (dir.clone(), closure_from_nix(path, dir).await?),
            None => {
                if !meta.is_dir() && !meta.is_file() {
                    return Err(ImageError::Source(format!(
                        "{}: not a directory or file",
                        path.display()
                    )));
                }
                (self.store_dir.clone(), Vec::new())
            }
        };
        let mut temp_tags: Vec<TempTag> = Vec::new();
        let mut entries = Vec::new();
        let total: u64 = if infos.is_empty() {
            // A plain directory: its file sizes, close to (a little under) its NAR size.
            let p = path.to_owned();
            tokio::task::spawn_blocking(move || tree_size(&p))
                .await
                .unwrap_or(0)
        } else {
            infos.iter().map(|i| i.nar_size).sum()
        };
        progress.start("importing", total);
        if infos.is_empty() {
            // A plain directory: one source path, named the way `nix-store --add` would.
            let (blob, summary, tag) = self.add_tree(path, progress).await?;
            let store_path = make_source_path(&store_dir, name, &summary.hash)
                .map_err(|e| ImageError::Source(e.to_string()))?;
            temp_tags.push(tag);
            entries.push(Entry {
                path: store_path.to_absolute(&store_dir),
                nar_hash: summary.hash.to_nix_string(),
                nar_size: summary.size,
                references: Vec::new(),
                deriver: None,
                blob: blob.to_hex().to_string(),
            });
        } else {
            // A few paths at once: each NAR's sha256 runs on a thread of its own, beside
            // the blob store hashing and writing the others.
            let added: Vec<_> = {
                use n0_future::{BufferedStreamExt, StreamExt};
                let paths: Vec<String> = infos
                    .iter()
                    .map(|info| info.path.to_absolute(&store_dir))
                    .collect();
                n0_future::stream::iter(paths.into_iter().map(|abs| async move {
                    let added = self.add_tree(Path::new(&abs), progress).await;
                    (abs, added)
                }))
                .buffered_ordered(import_parallelism())
                .collect()
                .await
            };
            for (info, (abs, added)) in infos.iter().zip(added) {
                let (blob, summary, tag) = added?;
                if summary.hash != info.nar_hash || summary.size != info.nar_size {
                    return Err(ImageError::Source(format!(
                        "{abs}: the NAR of the path on disk ({}, {} bytes) differs from what Nix recorded ({}, {} bytes); run `nix-store --verify-path {abs}`",
                        summary.hash, summary.size, info.nar_hash, info.nar_size
                    )));
                }
                temp_tags.push(tag);
                entries.push(Entry {
                    path: abs,
                    nar_hash: summary.hash.to_nix_string(),
                    nar_size: summary.size,
                    references: info
                        .references
                        .iter()
                        .map(|r| r.to_absolute(&store_dir))
                        .collect(),
                    deriver: info.deriver.as_ref().map(|d| d.to_absolute(&store_dir)),
                    blob: blob.to_hex().to_string(),
                });
            }
        }
        let root = match nix_store {
            Some(_) => infos
                .first()
                .map(|_| root_path(path, &store_dir))
                .transpose()?
                .unwrap_or_default(),
            None => entries.first().map(|e| e.path.clone()).unwrap_or_default(),
        };
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            store_dir: store_dir.as_str().to_string(),
            root,
            entries,
        };
        manifest.check()?;
        let bytes = manifest.to_bytes()?;
        let manifest_tag = self
            .blobs
            .add_bytes(bytes)
            .temp_tag()
            .await
            .map_err(|e| blob_err("storing the manifest")(e.to_string()))?;
        let mut seq = vec![manifest_tag.hash()];
        for e in &manifest.check()? {
            seq.push(e.blob);
        }
        let seq: HashSeq = seq.into_iter().collect();
        let root = self
            .blobs
            .add_bytes_with_opts((seq.into_inner(), BlobFormat::HashSeq))
            .temp_tag()
            .await
            .map_err(|e| blob_err("storing the hash sequence")(e.to_string()))?;
        let manifest_hash = root.hash();
        self.tag(manifest_hash).await?;
        drop((temp_tags, manifest_tag, root));
        {
            let mut index = self.index.write().map_err(|_| ImageError::Poisoned)?;
            add_to_index(&mut index, &manifest)?;
        }
        progress.finish();
        Ok(Imported {
            manifest_hash,
            manifest,
        })
    }

    async fn tag(&self, manifest: Hash) -> Result<(), ImageError> {
        self.blobs
            .tags()
            .set(
                format!("{TAG_PREFIX}{manifest}"),
                HashAndFormat::hash_seq(manifest),
            )
            .await
            .map_err(|e| blob_err("tagging the image")(e.to_string()))
    }

    /// Marks a fetched image as held here (its blobs are then kept) and indexes it.
    pub async fn keep(&self, manifest_hash: Hash, manifest: &Manifest) -> Result<(), ImageError> {
        self.tag(manifest_hash).await?;
        let mut index = self.index.write().map_err(|_| ImageError::Poisoned)?;
        add_to_index(&mut index, manifest)
    }

    /// Drops an image from this node: its tag goes, and blobs no other image uses are
    /// collected. Unpacked store paths stay (a VM may run from them).
    pub async fn forget(&self, manifest_hash: Hash) -> Result<(), ImageError> {
        self.blobs
            .tags()
            .delete(format!("{TAG_PREFIX}{manifest_hash}"))
            .await
            .map_err(|e| blob_err("untagging the image")(e.to_string()))?;
        self.reindex().await
    }

    /// Serialises a file tree to NAR and streams it into the blob store (which writes it
    /// once, to the file it keeps).
    async fn add_tree(
        &self,
        path: &Path,
        progress: &Progress,
    ) -> Result<(Hash, crate::nix::NarSummary, TempTag), ImageError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
        let (src, counter) = (path.to_owned(), progress.clone());
        let writer = tokio::task::spawn_blocking(move || {
            let chunks = Chunks {
                tx: tx.clone(),
                progress: counter,
            };
            let mut out = std::io::BufWriter::with_capacity(NAR_CHUNK, chunks);
            let summary = dump_path(&src, &mut out)
                .and_then(|summary| std::io::Write::flush(&mut out).map(|()| summary));
            if let Err(e) = &summary {
                // The store then gives up on the blob instead of keeping half a NAR.
                let _ = tx.blocking_send(Err(std::io::Error::new(e.kind(), e.to_string())));
            }
            summary.map_err(|e| ImageError::Io(src, e))
        });
        let stream = n0_future::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let added = self.blobs.add_stream(stream).await.temp_tag().await;
        let summary = writer
            .await
            .map_err(|e| ImageError::Blobs(format!("NAR writer: {e}")))?;
        match (summary, added) {
            (Ok(summary), Ok(tag)) => Ok((tag.hash(), summary, tag)),
            // The store stopped reading: its error says why.
            (Err(ImageError::Io(_, e)), Err(store))
                if e.kind() == std::io::ErrorKind::BrokenPipe =>
            {
                Err(blob_err("adding a NAR")(store.to_string()))
            }
            (Err(e), _) => Err(e),
            (Ok(_), Err(store)) => Err(blob_err("adding a NAR")(store.to_string())),
        }
    }

    /// Unpacks every store path of `manifest` that is not yet in the store dir, each
    /// verified against its NAR hash and size, atomically (unpacked beside, then renamed).
    /// Returns the paths it unpacked.
    pub async fn materialise(&self, manifest: &Manifest) -> Result<Vec<String>, ImageError> {
        let entries = manifest.check()?;
        let image_dir = manifest.store_dir()?;
        let target_dir = PathBuf::from(self.store_dir.as_str());
        std::fs::create_dir_all(&target_dir).map_err(|e| ImageError::Io(target_dir.clone(), e))?;
        let policy = UnpackPolicy {
            store_dir: image_dir.clone(),
        };
        let mut done = Vec::new();
        for e in entries {
            let name = e.path.base_name();
            let dest = target_dir.join(&name);
            if std::fs::symlink_metadata(&dest).is_ok() {
                continue;
            }
            // The blob's own file when it has one; else a copy exported to the stage dir.
            let (file, staged) = match self.blob_file(&e.blob, e.nar_size) {
                Some(file) => (file, None),
                None => {
                    let nar = self
                        .stage
                        .join(format!("{:016x}.nar", rand::random::<u64>()));
                    self.blobs
                        .export(e.blob, &nar)
                        .await
                        .map_err(|err| blob_err("exporting a NAR")(err.to_string()))?;
                    let file = std::fs::File::open(&nar).map_err(|err| {
                        let _ = std::fs::remove_file(&nar);
                        ImageError::Io(nar.clone(), err)
                    })?;
                    (file, Some(nar))
                }
            };
            let tmp = target_dir.join(format!(".blixard-unpack-{:016x}", rand::random::<u64>()));
            let (tmp2, policy2) = (tmp.clone(), policy.clone());
            let expect = (e.nar_hash, e.nar_size);
            let result = tokio::task::spawn_blocking(move || {
                let reader = std::io::BufReader::with_capacity(1 << 20, file);
                unpack_nar(reader, &tmp2, Some(expect), &policy2).map_err(ImageError::Nar)
            })
            .await
            .map_err(|err| ImageError::Blobs(format!("NAR reader: {err}")));
            if let Some(nar) = staged {
                let _ = std::fs::remove_file(&nar);
            }
            let abs = e.path.to_absolute(&image_dir);
            match result {
                Ok(Ok(_)) => {}
                Ok(Err(err)) | Err(err) => {
                    return Err(ImageError::Unpack {
                        path: abs,
                        detail: err.to_string(),
                    })
                }
            }
            if let Err(err) = std::fs::rename(&tmp, &dest) {
                let _ = remove_tree(&tmp);
                // Another unpack of the same path won the race: that is the same content.
                if std::fs::symlink_metadata(&dest).is_err() {
                    return Err(ImageError::Io(dest, err));
                }
                continue;
            }
            done.push(abs);
        }
        Ok(done)
    }
}

/// How many store paths of a closure an import serialises at once: one per CPU, at most
/// four.
fn import_parallelism() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4))
}

/// How much of a NAR goes to the blob store at a time.
const NAR_CHUNK: usize = 1 << 20;

/// A NAR being written, handed to the blob store in chunks, counted into a progress
/// report.
struct Chunks {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    progress: Progress,
}

impl std::io::Write for Chunks {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tx
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "the blob store stopped reading the NAR",
                )
            })?;
        self.progress.advance(buf.len() as u64);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The store paths of the complete local images: what the binary cache serves.
#[derive(Debug, Default)]
struct Index {
    by_hash_part: HashMap<String, CachedPath>,
    by_blob: HashMap<Hash, String>,
}

fn add_to_index(index: &mut Index, manifest: &Manifest) -> Result<(), ImageError> {
    let store_dir = manifest.store_dir()?;
    for entry in manifest.check()? {
        let hash_part = entry.path.hash_part();
        index.by_blob.insert(entry.blob, hash_part.clone());
        index.by_hash_part.insert(
            hash_part,
            CachedPath {
                entry,
                store_dir: store_dir.clone(),
            },
        );
    }
    Ok(())
}

/// The bytes of the regular files under `path` (not following symlinks).
fn tree_size(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(path)
            .map(|entries| entries.flatten().map(|e| tree_size(&e.path())).sum())
            .unwrap_or(0)
    } else if meta.is_file() {
        meta.len()
    } else {
        0
    }
}

/// Removes a tree that may contain read-only directories.
pub(crate) fn remove_tree(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fn make_writable(p: &Path) {
        if let Ok(m) = std::fs::symlink_metadata(p) {
            if m.is_dir() {
                let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755));
                if let Ok(entries) = std::fs::read_dir(p) {
                    for e in entries.flatten() {
                        make_writable(&e.path());
                    }
                }
            }
        }
    }
    make_writable(path);
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

/// The Nix store `path` lives in, if it is a store path of a Nix store on this host.
fn nix_store_of(path: &Path) -> Option<StoreDir> {
    let s = path.to_str()?;
    let dir = std::env::var("NIX_STORE_DIR").unwrap_or_else(|_| "/nix/store".to_string());
    let dir = StoreDir::new(&dir).ok()?;
    let rest = s.strip_prefix(dir.as_str())?.strip_prefix('/')?;
    let first = rest.split('/').next()?;
    StorePath::from_base_name(first).ok().map(|_| dir)
}

/// The store path `path` is in (it may point inside one).
fn root_path(path: &Path, dir: &StoreDir) -> Result<String, ImageError> {
    let s = path.to_str().unwrap_or_default();
    let rest = s
        .strip_prefix(dir.as_str())
        .and_then(|r| r.strip_prefix('/'))
        .unwrap_or_default();
    let first = rest.split('/').next().unwrap_or_default();
    let p = StorePath::from_base_name(first).map_err(|e| ImageError::Source(e.to_string()))?;
    Ok(p.to_absolute(dir))
}

/// One store path of a closure as Nix reports it.
#[derive(Clone, Debug)]
struct ClosurePath {
    path: StorePath,
    nar_hash: NarHash,
    nar_size: u64,
    references: Vec<StorePath>,
    deriver: Option<StorePath>,
}

/// Asks Nix for the closure of `path`, root first.
async fn closure_from_nix(path: &Path, dir: &StoreDir) -> Result<Vec<ClosurePath>, ImageError> {
    let root = root_path(path, dir)?;
    let out = tokio::process::Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--json",
            "--recursive",
            &root,
        ])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| {
            ImageError::Source(format!(
                "{root} is a Nix store path, but `nix path-info` could not run: {e}"
            ))
        })?;
    if !out.status.success() {
        return Err(ImageError::Source(format!(
            "nix path-info {root}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let infos = parse_path_info_json(&text, dir).map_err(|e| ImageError::Source(e.to_string()))?;
    let mut by_path: BTreeMap<String, ClosurePath> = BTreeMap::new();
    for i in infos {
        by_path.insert(
            i.path.to_absolute(dir),
            ClosurePath {
                path: i.path,
                nar_hash: i.nar_hash,
                nar_size: i.nar_size,
                references: i.references,
                deriver: i.deriver,
            },
        );
    }
    let Some(first) = by_path.remove(&root) else {
        return Err(ImageError::Source(format!(
            "nix path-info did not report {root}"
        )));
    };
    let mut out = vec![first];
    out.extend(by_path.into_values());
    Ok(out)
}
