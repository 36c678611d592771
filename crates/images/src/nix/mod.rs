//! Nix formats: store paths, NAR hashes, NAR archives, narinfo files, binary cache signing
//! keys and `nix path-info --json` output.
//!
//! This module is the one place Blixard reads or writes a Nix format, so that it can later be
//! replaced by `nix-compat` without touching its callers. Everything here is pure data
//! handling plus file-tree IO for NARs; nothing runs `nix`.
//!
//! **Invariant:** unpacking a NAR never writes outside its destination directory and never
//! follows a symlink while writing; a NAR that fails any check leaves nothing behind.
//!
//! Formats follow Nix 2.8 (the oldest Nix Blixard supports) and stay readable by newer Nix:
//! - store path digests and hashes in narinfo files use Nix's base32 ([`base32`]);
//! - a source path is `sha256(fingerprint)` folded to 20 bytes ([`make_source_path`]);
//! - NAR is the canonical `nix-store --dump` serialisation ([`dump_path`], [`unpack_nar`]);
//! - signatures are ed25519 over the narinfo fingerprint ([`SigningKey`], [`NarInfo`]).

pub mod base32;
mod error;
mod hash;
mod nar;
mod narinfo;
mod path_info;
mod signing;
mod store_path;

pub use error::{NarError, ParseError};
pub use hash::NarHash;
pub use nar::{dump_path, unpack_nar, verify_nar, NarSummary, UnpackPolicy};
pub use narinfo::NarInfo;
pub use path_info::{parse_path_info_json, PathInfo};
pub use signing::{PublicKey, SigningKey};
pub use store_path::{make_source_path, StoreDir, StorePath};
