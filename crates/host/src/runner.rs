//! A microvm.nix runner: a directory (usually a store path) with `bin/microvm-run`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::HostError;

/// A checked runner directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Runner {
    pub dir: PathBuf,
}

impl Runner {
    /// Checks that `dir` holds an executable `bin/microvm-run`.
    pub fn new(dir: &Path) -> Result<Self, HostError> {
        let run = dir.join("bin/microvm-run");
        let meta = std::fs::metadata(&run).map_err(|e| {
            HostError::Runner(
                dir.to_owned(),
                format!("no bin/microvm-run ({e}); is this a microvm.nix runner?"),
            )
        })?;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Err(HostError::Runner(
                dir.to_owned(),
                "bin/microvm-run is not an executable file".into(),
            ));
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn run(&self) -> PathBuf {
        self.dir.join("bin/microvm-run")
    }

    /// `bin/microvm-shutdown`, when the runner has one.
    pub fn shutdown(&self) -> Option<PathBuf> {
        let p = self.dir.join("bin/microvm-shutdown");
        p.is_file().then_some(p)
    }
}
