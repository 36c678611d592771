//! Images as cluster state knows them: a name bound to a manifest blob, and who holds it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ids::{BlobHash, NodeId};

/// A registered image: a closure (a root store path and everything it references), stored
/// as one NAR blob per store path plus a manifest that lists them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Unique in the cluster (see [`crate::valid_name`]).
    pub name: String,
    /// The iroh-blobs hash sequence: the manifest blob first, then one NAR per store path.
    pub manifest: BlobHash,
    /// The root store path, e.g. `/nix/store/…-microvm-qemu-web`.
    pub root: String,
    /// The store dir the closure's paths belong to.
    pub store_dir: String,
    /// How many store paths (NARs) the closure has.
    pub nar_count: u32,
    /// The sum of the NAR sizes, in bytes.
    pub nar_size: u64,
    /// The nodes that hold every blob of the image.
    pub holders: BTreeSet<NodeId>,
    /// A pinned image cannot be removed, and no node evicts it.
    pub pinned: bool,
    /// The tenant that owns the image; `None` for images shared by the whole cluster.
    pub tenant: Option<String>,
    pub created_at_ms: u64,
}

/// The most NARs one image may list, and the largest closure: far beyond any VM, small
/// enough that a hostile manifest cannot make a node allocate without bound.
pub const MAX_IMAGE_NARS: u32 = 100_000;
pub const MAX_IMAGE_BYTES: u64 = 1 << 40;
