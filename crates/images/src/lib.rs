//! Images: a VM's closure (a root store path and everything it references) stored as one
//! NAR blob per store path plus a manifest, in an iroh-blobs store; fetched from the nodes
//! that hold it, unpacked with checks, and served to Nix as a binary cache.
//!
//! **Boundary:** knows nothing of Raft, Cedar or VMs. Callers say which nodes hold an image
//! and whether a caller may fetch; this crate moves and checks bytes.

pub mod cache;
pub mod fetch;
pub mod manifest;
pub mod nix;
pub mod progress;
pub mod store;

use std::path::PathBuf;

pub use fetch::{fetch, fetch_manifest, FetchReport, Holder, HolderStats};
pub use manifest::Manifest;
pub use progress::{Progress, ProgressEvent};
pub use store::{ImageStore, Imported};

/// Errors of image operations. Each names the image path or blob involved.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}", path = .0.display(), source = .1)]
    Io(PathBuf, #[source] std::io::Error),
    #[error("blob store: {0}")]
    Blobs(String),
    #[error("bad manifest: {0}")]
    Manifest(String),
    #[error("cannot import: {0}")]
    Source(String),
    #[error("fetch failed: {0}")]
    Fetch(String),
    #[error("cannot unpack {path}: {detail}")]
    Unpack { path: String, detail: String },
    #[error(transparent)]
    Nar(#[from] nix::NarError),
    #[error("a lock was poisoned")]
    Poisoned,
}
