//! The NAR reader: checking a NAR (`verify_nar`) and unpacking one (`unpack_nar`), as a
//! node does with the NARs it fetches from peers.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use blixard_images::nix::{dump_path, unpack_nar, verify_nar, NarHash, UnpackPolicy};
use libfuzzer_sys::fuzz_target;

/// This process's scratch directory.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("blixard-fuzz-nar-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        dir
    })
}

/// Removes an unpacked tree (its directories are read-only).
fn remove(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return;
    };
    if md.is_dir() {
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
        if let Ok(entries) = std::fs::read_dir(path) {
            for e in entries.flatten() {
                remove(&e.path());
            }
        }
        let _ = std::fs::remove_dir(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
}

fuzz_target!(|data: &[u8]| {
    let verified = verify_nar(data, None);
    // The expected hash and size are checked, not trusted.
    let expect = (NarHash::digest(data), data.len() as u64);
    assert_eq!(verify_nar(data, Some(expect)).ok(), verified.as_ref().ok().copied());
    if let Some(shorter) = (data.len() as u64).checked_sub(1) {
        assert!(verify_nar(data, Some((expect.0, shorter))).is_err());
    }

    let dest = scratch().join("out");
    remove(&dest);
    match unpack_nar(data, &dest, None, &UnpackPolicy::default()) {
        Ok(summary) => {
            assert!(verified.is_ok());
            assert_eq!(summary.size, data.len() as u64);
            // A NAR that unpacks is canonical: the tree dumps to the same bytes.
            let mut again = Vec::new();
            assert!(dump_path(&dest, &mut again).is_ok());
            assert!(again == data, "unpacked tree dumps differently");
        }
        // A NAR that fails leaves nothing behind.
        Err(_) => assert!(std::fs::symlink_metadata(&dest).is_err()),
    }
    remove(&dest);
});
