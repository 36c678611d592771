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

    /// The tap interfaces the VM needs, from `share/microvm/tap-interfaces` (one name a
    /// line, as microvm.nix writes it); none when the runner has no such file. A name the
    /// kernel would not take (see the crate docs) is an error naming it.
    pub fn tap_interfaces(&self) -> Result<Vec<String>, HostError> {
        let bad = |e: String| {
            HostError::Runner(
                self.dir.clone(),
                format!("share/microvm/tap-interfaces: {e}"),
            )
        };
        match std::fs::read_to_string(self.dir.join("share/microvm/tap-interfaces")) {
            Ok(text) => crate::taps::parse_list(&text).map_err(bad),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(bad(e.to_string())),
        }
    }
}
