//! `cluster backup`, `cluster backup verify` and `node restore`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use blixard_core::backup::{self, Backup, BackupHeader};
use blixard_net::api::BackupRequest;
use blixard_node::daemon::{self, RestoreArgs};
use blixard_node::exit::{self, Failure};
use serde::Serialize;

use super::format::{self as output, Format};
use super::{call, Context};

/// A backup file as `backup` and `verify` print it.
#[derive(Serialize)]
struct Summary<'a> {
    file: &'a Path,
    bytes: u64,
    #[serde(flatten)]
    header: &'a BackupHeader,
    tables: &'a BTreeMap<String, usize>,
}

fn print(ctx: &Context, file: &Path, bytes: u64, b: &Backup) -> Result<(), Failure> {
    let s = Summary {
        file,
        bytes,
        header: &b.header,
        tables: &b.tables,
    };
    if ctx.output == Format::Json {
        return output::json(&s).map_err(|e| Failure::new(exit::ERROR, e));
    }
    let h = &b.header;
    out!("file      {} ({bytes} bytes)", file.display());
    out!("cluster   {} ({})", h.cluster_name, h.cluster_id);
    out!("state at  index {}, term {}", h.index, h.term);
    out!(
        "taken     by n{} (blixard {}) at {} ms since the epoch",
        h.node,
        h.version,
        h.created_at_ms
    );
    let tables: Vec<String> = b.tables.iter().map(|(t, n)| format!("{t} {n}")).collect();
    out!("rows      {}", tables.join(", "));
    Ok(())
}

/// `cluster backup --out FILE`: the node's copy of the whole state, checked here, then
/// written to a temporary file beside FILE (mode 0600: it holds the cache's signing key),
/// fsync'd and renamed over FILE.
pub async fn backup(ctx: &Context, out: &Path) -> Result<(), Failure> {
    let data = call(ctx, BackupRequest {}).await?;
    let checked = backup::decode(&data.bytes).map_err(|e| {
        Failure::new(
            exit::ERROR,
            format!("the node sent a backup that does not check: {e}"),
        )
    })?;
    write_private(out, &data.bytes)
        .map_err(|e| Failure::new(exit::ERROR, format!("cannot write {}: {e}", out.display())))?;
    print(ctx, out, data.bytes.len() as u64, &checked)
}

/// `cluster backup verify FILE`.
pub fn verify(ctx: &Context, file: &Path) -> Result<(), Failure> {
    let b = daemon::read_backup(file)?;
    let bytes = std::fs::metadata(file).map(|m| m.len()).unwrap_or_default();
    print(ctx, file, bytes, &b)
}

/// `node restore FILE --data-dir DIR`.
pub fn restore(ctx: &Context, file: &Path, args: &RestoreArgs) -> Result<(), Failure> {
    let r = daemon::restore(&ctx.data_dir, file, args)?;
    if ctx.output == Format::Json {
        return output::json(&r).map_err(|e| Failure::new(exit::ERROR, e));
    }
    out!(
        "restored cluster {} ({}) from {} (index {}, term {}, taken by n{})",
        r.cluster_name,
        r.cluster_id,
        file.display(),
        r.from_index,
        r.from_term,
        r.from_node
    );
    out!(
        "this node is n{}, its only member; {} old member(s) removed",
        r.node,
        r.members_removed
    );
    out!("VMs to place again: {}", r.vms_to_place);
    if !r.images_to_import.is_empty() {
        out!(
            "images held by no one (import them again): {}",
            r.images_to_import.join(", ")
        );
    }
    out!(
        "start it: blixard node run --data-dir {}",
        r.data_dir.display()
    );
    Ok(())
}

/// Writes `bytes` to `path` whole or not at all: a new file beside it (0600), fsync'd,
/// renamed over it, and the directory fsync'd.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "backup".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
