//! Secret keys on disk: 32 raw bytes as hex, in a file only the owner can read.

use std::io::Write;
use std::path::Path;

use iroh::SecretKey;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write key {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path} is malformed (expected 64 hex characters)")]
    Malformed { path: String },
    #[error("key file {path} is readable by others (mode {mode:o}); run: chmod 600 {path}")]
    Permissions { path: String, mode: u32 },
}

/// Loads a secret key written by [`create`].
pub fn load(path: &Path) -> Result<SecretKey, KeyError> {
    let p = path.display().to_string();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
            path: p.clone(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path: p, mode });
        }
    }
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: p.clone(),
        source,
    })?;
    let key: blixard_core::EndpointKey = text
        .trim()
        .parse()
        .map_err(|_| KeyError::Malformed { path: p })?;
    Ok(SecretKey::from_bytes(&key.0))
}

/// Writes a new random key with mode 0600; refuses to overwrite an existing file.
pub fn create(path: &Path) -> Result<SecretKey, KeyError> {
    let key = SecretKey::generate();
    let p = path.display().to_string();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(path).map_err(|source| KeyError::Write {
        path: p.clone(),
        source,
    })?;
    let hex = blixard_core::EndpointKey(key.to_bytes()).to_string();
    file.write_all(format!("{hex}\n").as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|source| KeyError::Write { path: p, source })?;
    Ok(key)
}

/// Loads the key at `path`, creating it first if it does not exist.
pub fn load_or_create(path: &Path) -> Result<SecretKey, KeyError> {
    if path.exists() {
        load(path)
    } else {
        create(path)
    }
}
