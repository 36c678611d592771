//! The backup file (`blixard cluster backup`): the whole state machine at one applied
//! index, with a header saying whose and when, and a checksum over all of it.
//!
//! Layout: [`MAGIC`] (8 bytes); the format version (u16, big-endian); the body, postcard
//! of the header and the state's rows in the versioned encoding snapshots use; the BLAKE3
//! hash of everything before it (32 bytes). The version comes before anything that could
//! change shape, so a newer file is refused by name, not misread.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::encoding::{decode_versioned, encode_versioned};
use crate::ids::{ClusterId, NodeId};
use crate::state::{LoadError, State};
use crate::table::Row;

/// The first bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"BLIXBKUP";
/// The format this build writes, and the newest it reads.
pub const BACKUP_FORMAT: u16 = 1;
/// The largest backup file read or written.
pub const MAX_BACKUP: usize = 1 << 30;

const HASH: usize = 32;
const PREFIX: usize = MAGIC.len() + 2;

/// Who made a backup, of what, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHeader {
    pub cluster_id: ClusterId,
    pub cluster_name: String,
    /// The applied index (and its term) the state is a copy at.
    pub index: u64,
    pub term: u64,
    pub created_at_ms: u64,
    /// The member that made it.
    pub node: NodeId,
    /// The `blixard` version that wrote it.
    pub version: String,
}

#[derive(Serialize, Deserialize)]
struct Body {
    header: BackupHeader,
    rows: Vec<Row>,
}

/// A backup file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not a Blixard backup (it does not start with the backup header)")]
    NotABackup,
    #[error("backup is {0} bytes, over the {MAX_BACKUP}-byte limit")]
    TooLarge(usize),
    #[error("backup is damaged: its checksum does not match its contents")]
    Checksum,
    #[error("backup format {found} was written by a newer blixard (this build reads format {BACKUP_FORMAT} and older)")]
    Newer { found: u16 },
    #[error("backup is damaged: {0}")]
    Malformed(String),
    #[error("backup holds state this build cannot load: {0}")]
    State(#[from] LoadError),
}

/// A backup, checked and loaded.
#[derive(Debug)]
pub struct Backup {
    pub header: BackupHeader,
    pub state: State,
    /// Rows per state table.
    pub tables: BTreeMap<String, usize>,
}

/// Writes the backup file's bytes for `rows` under `header`.
pub fn encode(header: &BackupHeader, rows: Vec<Row>) -> Result<Vec<u8>, BackupError> {
    let body = encode_versioned(&Body {
        header: header.clone(),
        rows,
    });
    let mut out = Vec::with_capacity(PREFIX + body.len() + HASH);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&BACKUP_FORMAT.to_be_bytes());
    out.extend_from_slice(&body);
    let hash = blake3::hash(&out);
    out.extend_from_slice(hash.as_bytes());
    if out.len() > MAX_BACKUP {
        return Err(BackupError::TooLarge(out.len()));
    }
    Ok(out)
}

/// Checks a backup file's bytes (size, header, version, checksum) and loads its state.
pub fn decode(bytes: &[u8]) -> Result<Backup, BackupError> {
    if bytes.len() > MAX_BACKUP {
        return Err(BackupError::TooLarge(bytes.len()));
    }
    if bytes.len() < PREFIX + HASH || &bytes[..MAGIC.len()] != MAGIC {
        return Err(BackupError::NotABackup);
    }
    let found = u16::from_be_bytes([bytes[MAGIC.len()], bytes[MAGIC.len() + 1]]);
    if found > BACKUP_FORMAT {
        return Err(BackupError::Newer { found });
    }
    let (covered, hash) = bytes.split_at(bytes.len() - HASH);
    if blake3::hash(covered).as_bytes() != hash {
        return Err(BackupError::Checksum);
    }
    decode_body(&covered[PREFIX..])
}

/// Loads a backup's body, trusting that its checksum matched (the fuzz target's way in).
pub fn decode_body(body: &[u8]) -> Result<Backup, BackupError> {
    let Body { header, rows } =
        decode_versioned(body).map_err(|e| BackupError::Malformed(e.to_string()))?;
    let mut tables = BTreeMap::new();
    for row in &rows {
        *tables.entry(row.table.clone()).or_insert(0) += 1;
    }
    let state = State::from_rows(rows.iter().map(|r| {
        (
            r.table.as_str(),
            r.key.as_slice(),
            r.value.as_deref().unwrap_or_default(),
        )
    }))?;
    if state.cluster().is_none() {
        return Err(BackupError::Malformed("it holds no cluster".into()));
    }
    Ok(Backup {
        header,
        state,
        tables,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, NewMember};
    use crate::ids::EndpointKey;

    fn state() -> State {
        let mut s = State::new();
        s.apply(&Command::Bootstrap {
            cluster_id: ClusterId([3; 16]),
            name: "prod".into(),
            member: NewMember {
                name: "n1".into(),
                endpoint: EndpointKey([1; 32]),
                addrs: vec![],
                labels: Default::default(),
                capacity: Default::default(),
            },
            admin: EndpointKey([2; 32]),
            now_ms: 1,
        })
        .unwrap();
        s.apply(&Command::SetMeta {
            key: "owner".into(),
            value: Some("ops".into()),
        })
        .unwrap();
        s
    }

    fn header() -> BackupHeader {
        BackupHeader {
            cluster_id: ClusterId([3; 16]),
            cluster_name: "prod".into(),
            index: 7,
            term: 2,
            created_at_ms: 9,
            node: NodeId(1),
            version: "0.1.0".into(),
        }
    }

    #[test]
    fn a_backup_round_trips_and_counts_its_tables() {
        let s = state();
        let bytes = encode(&header(), s.all_rows()).unwrap();
        let b = decode(&bytes).unwrap();
        assert_eq!(b.header, header());
        assert_eq!(b.state.digest(), s.digest());
        assert_eq!(b.tables.get("kv"), Some(&1));
        assert_eq!(b.tables.get("members"), Some(&1));
    }

    #[test]
    fn damage_of_any_kind_is_refused_by_name() {
        let bytes = encode(&header(), state().all_rows()).unwrap();
        // Every byte flipped: refused (never a panic, never loaded).
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode(&b).is_err(), "flipped byte {i} went unnoticed");
        }
        // Cut anywhere.
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "cut at {n}");
        }
        assert!(matches!(decode(b"hello"), Err(BackupError::NotABackup)));
        let mut newer = bytes.clone();
        newer[MAGIC.len()..PREFIX].copy_from_slice(&2u16.to_be_bytes());
        let e = decode(&newer).unwrap_err();
        assert!(matches!(e, BackupError::Newer { found: 2 }));
        assert!(e.to_string().contains("format 2") && e.to_string().contains("format 1"));
        let mut flipped = bytes.clone();
        flipped[PREFIX + 3] ^= 1;
        assert!(matches!(decode(&flipped), Err(BackupError::Checksum)));
    }
}
