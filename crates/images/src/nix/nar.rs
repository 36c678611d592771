//! NAR (Nix ARchive): the canonical serialisation of a file tree, as `nix-store --dump`
//! writes it.
//!
//! Every token is a string: a little-endian u64 length, the bytes, zero padding to a multiple
//! of 8. The archive is `"nix-archive-1"` followed by one node:
//!
//! ```text
//! node  = "(" "type" ( "regular" ["executable" ""] "contents" <bytes>
//!                    | "symlink" "target" <target>
//!                    | "directory" { "entry" "(" "name" <name> "node" node ")" } ) ")"
//! ```
//!
//! Directory entries are sorted by name (bytewise) without duplicates. The reader here is
//! strict: it accepts only that canonical form, so a NAR that passes re-dumps to the same
//! bytes.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::{NarError, NarHash, StoreDir};

const MAGIC: &[u8] = b"nix-archive-1";
/// Longest keyword token (`nix-archive-1`, `directory`, ...) we read before giving up.
const MAX_KEYWORD: u64 = 32;
/// Longest entry name (Linux NAME_MAX).
pub const MAX_NAME_LEN: u64 = 255;
/// Longest symlink target (Linux PATH_MAX).
pub const MAX_TARGET_LEN: u64 = 4096;
/// Deepest directory nesting accepted.
pub const MAX_DEPTH: usize = 256;
const CHUNK: usize = 64 * 1024;
/// The mtime Nix gives everything in the store.
const NIX_MTIME: Duration = Duration::from_secs(1);

/// Hash and size of a NAR serialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NarSummary {
    pub hash: NarHash,
    pub size: u64,
}

/// What an unpacked tree may contain beyond plain files and directories.
///
/// Symlink targets are checked lexically, without looking at the file system:
/// - an absolute target is allowed only below `store_dir` (real closures link into
///   `/nix/store`), and may not contain `..`;
/// - a relative target may start with `..` components, at most as many as the link is deep
///   inside the archive, and may not contain `..` after any other component (`a/../b` is
///   refused even though it stays inside: with `a` itself a symlink it could escape).
///
/// So no link, and no chain of links, resolves outside the unpacked tree except into the
/// store dir. A symlink at the archive root must be absolute. Empty targets and targets containing NUL are refused.
#[derive(Clone, Debug, Default)]
pub struct UnpackPolicy {
    pub store_dir: StoreDir,
}

// ---------------------------------------------------------------------------------------
// Writing

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        let written = buf.get(..n).unwrap_or(buf);
        self.hasher.update(written);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn write_padding(w: &mut impl Write, len: u64) -> io::Result<()> {
    let pad = ((8 - len % 8) % 8) as usize;
    w.write_all(&[0u8; 8][..pad])
}

fn write_str(w: &mut impl Write, s: &[u8]) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s)?;
    write_padding(w, s.len() as u64)
}

/// Serialises the file tree at `path` (a regular file, symlink or directory; not followed if
/// a symlink) to `out` exactly as `nix-store --dump` does, returning its hash and size.
///
/// A file is executable in the NAR if its owner-execute bit is set. Other file types
/// (sockets, devices, fifos) are an error.
pub fn dump_path(path: &Path, out: &mut impl Write) -> io::Result<NarSummary> {
    let hashing = HashingWriter {
        inner: out,
        hasher: Sha256::new(),
        size: 0,
    };
    let mut w = BufWriter::with_capacity(CHUNK, hashing);
    write_str(&mut w, MAGIC)?;
    dump_node(path, &mut w)?;
    let hashing = w.into_inner().map_err(|e| e.into_error())?;
    Ok(NarSummary {
        hash: NarHash(hashing.hasher.finalize().into()),
        size: hashing.size,
    })
}

fn dump_node(path: &Path, w: &mut impl Write) -> io::Result<()> {
    let md = fs::symlink_metadata(path)?;
    write_str(w, b"(")?;
    write_str(w, b"type")?;
    let ft = md.file_type();
    if ft.is_file() {
        write_str(w, b"regular")?;
        if md.permissions().mode() & 0o100 != 0 {
            write_str(w, b"executable")?;
            write_str(w, b"")?;
        }
        write_str(w, b"contents")?;
        let len = md.len();
        w.write_all(&len.to_le_bytes())?;
        let file = File::open(path)?;
        let copied = io::copy(&mut file.take(len), w)?;
        if copied != len {
            return Err(io::Error::other(format!(
                "{} changed size while being archived",
                path.display()
            )));
        }
        write_padding(w, len)?;
    } else if ft.is_symlink() {
        write_str(w, b"symlink")?;
        write_str(w, b"target")?;
        write_str(w, fs::read_link(path)?.as_os_str().as_bytes())?;
    } else if ft.is_dir() {
        write_str(w, b"directory")?;
        let mut names: Vec<OsString> = fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            write_str(w, b"entry")?;
            write_str(w, b"(")?;
            write_str(w, b"name")?;
            write_str(w, name.as_bytes())?;
            write_str(w, b"node")?;
            dump_node(&path.join(&name), w)?;
            write_str(w, b")")?;
        }
    } else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{} is not a regular file, symlink or directory",
                path.display()
            ),
        ));
    }
    write_str(w, b")")
}

// ---------------------------------------------------------------------------------------
// Reading

/// The reader side: counts and hashes every byte, stops at the expected size.
struct Input<R> {
    inner: BufReader<R>,
    hasher: Sha256,
    offset: u64,
    limit: Option<u64>,
}

/// Where the parser is inside the archive: the names from the root.
type Comps = Vec<Vec<u8>>;

fn show(comps: &[Vec<u8>]) -> String {
    if comps.is_empty() {
        return "/".to_owned();
    }
    let mut s = String::new();
    for c in comps {
        s.push('/');
        s.push_str(&String::from_utf8_lossy(c));
    }
    s
}

fn lossy_prefix(b: &[u8]) -> String {
    let cut = b.get(..64).unwrap_or(b);
    String::from_utf8_lossy(cut).into_owned()
}

impl<R: Read> Input<R> {
    /// Reads one byte past the point where the NAR should have ended; true if there is one.
    fn has_more(&mut self) -> Result<bool, NarError> {
        let mut b = [0u8; 1];
        loop {
            match self.inner.read(&mut b) {
                Ok(n) => return Ok(n > 0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NarError::Read(e)),
            }
        }
    }

    fn fill(&mut self, buf: &mut [u8], at: &[Vec<u8>]) -> Result<(), NarError> {
        let mut done = 0;
        while done < buf.len() {
            let want = buf.len() - done;
            let allowed = match self.limit {
                Some(limit) => want.min(usize::try_from(limit - self.offset).unwrap_or(want)),
                None => want,
            };
            if allowed == 0 {
                return Err(self.stopped_at_limit(at));
            }
            let Some(dst) = buf.get_mut(done..done + allowed) else {
                return Err(self.truncated(at));
            };
            let n = match self.inner.read(dst) {
                Ok(0) => return Err(self.truncated(at)),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NarError::Read(e)),
            };
            if let Some(got) = dst.get(..n) {
                self.hasher.update(got);
            }
            done += n;
            self.offset += n as u64;
        }
        Ok(())
    }

    fn truncated(&self, at: &[Vec<u8>]) -> NarError {
        NarError::Truncated {
            path: show(at),
            offset: self.offset,
        }
    }

    /// The NAR needs more bytes than expected: either it is longer than expected, or the
    /// stream ends there too and it is truncated.
    fn stopped_at_limit(&mut self, at: &[Vec<u8>]) -> NarError {
        match self.has_more() {
            Ok(true) => NarError::SizeMismatch {
                expected: self.offset,
                actual: self.offset + 1,
                more: true,
            },
            Ok(false) => self.truncated(at),
            Err(e) => e,
        }
    }

    fn read_u64(&mut self, at: &[Vec<u8>]) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.fill(&mut b, at)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_padding(&mut self, len: u64, at: &[Vec<u8>]) -> Result<(), NarError> {
        let pad = ((8 - len % 8) % 8) as usize;
        let mut b = [0u8; 8];
        let offset = self.offset;
        let Some(dst) = b.get_mut(..pad) else {
            return Ok(());
        };
        self.fill(dst, at)?;
        if dst.iter().any(|&x| x != 0) {
            return Err(NarError::BadPadding {
                path: show(at),
                offset,
            });
        }
        Ok(())
    }

    fn read_string(&mut self, max: u64, at: &[Vec<u8>]) -> Result<Vec<u8>, NarError> {
        let offset = self.offset;
        let len = self.read_u64(at)?;
        if len > max {
            return Err(NarError::StringTooLong {
                path: show(at),
                offset,
                len,
                max,
            });
        }
        // len <= max <= 4096, so this allocation is bounded.
        let mut s = vec![0u8; len as usize];
        self.fill(&mut s, at)?;
        self.read_padding(len, at)?;
        Ok(s)
    }

    fn expect(&mut self, token: &'static str, at: &[Vec<u8>]) -> Result<(), NarError> {
        let offset = self.offset;
        let got = self.read_string(MAX_KEYWORD, at)?;
        if got != token.as_bytes() {
            return Err(NarError::UnexpectedToken {
                path: show(at),
                offset,
                expected: token,
                found: lossy_prefix(&got),
            });
        }
        Ok(())
    }
}

/// Receives the tree as it is parsed. Paths are the names from the root (empty: the root).
trait Sink {
    fn begin_file(&mut self, at: &[Vec<u8>], executable: bool) -> Result<(), NarError>;
    fn file_data(&mut self, data: &[u8]) -> Result<(), NarError>;
    fn end_file(&mut self) -> Result<(), NarError>;
    fn symlink(&mut self, at: &[Vec<u8>], target: &[u8]) -> Result<(), NarError>;
    fn begin_dir(&mut self, at: &[Vec<u8>]) -> Result<(), NarError>;
    fn end_dir(&mut self, at: &[Vec<u8>]) -> Result<(), NarError>;
}

struct NullSink;

impl Sink for NullSink {
    fn begin_file(&mut self, _: &[Vec<u8>], _: bool) -> Result<(), NarError> {
        Ok(())
    }
    fn file_data(&mut self, _: &[u8]) -> Result<(), NarError> {
        Ok(())
    }
    fn end_file(&mut self) -> Result<(), NarError> {
        Ok(())
    }
    fn symlink(&mut self, _: &[Vec<u8>], _: &[u8]) -> Result<(), NarError> {
        Ok(())
    }
    fn begin_dir(&mut self, _: &[Vec<u8>]) -> Result<(), NarError> {
        Ok(())
    }
    fn end_dir(&mut self, _: &[Vec<u8>]) -> Result<(), NarError> {
        Ok(())
    }
}

fn check_name(name: &[u8], dir: &[Vec<u8>]) -> Result<(), NarError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name == b"." || name == b".." {
        "`.` or `..`"
    } else if name.contains(&b'/') {
        "contains `/`"
    } else if name.contains(&0) {
        "contains NUL"
    } else {
        return Ok(());
    };
    Err(NarError::BadName {
        path: show(dir),
        name: lossy_prefix(name),
        reason,
    })
}

fn check_symlink(at: &[Vec<u8>], target: &[u8], policy: &UnpackPolicy) -> Result<(), NarError> {
    let bad = |reason| NarError::BadSymlink {
        path: show(at),
        target: lossy_prefix(target),
        reason,
    };
    if target.is_empty() {
        return Err(bad("empty"));
    }
    if target.contains(&0) {
        return Err(bad("contains NUL"));
    }
    let meaningful = |c: &&[u8]| !c.is_empty() && *c != b".";
    if target.starts_with(b"/") {
        let store = policy.store_dir.as_str().as_bytes();
        let rest = target
            .strip_prefix(store)
            .and_then(|r| r.strip_prefix(b"/"))
            .ok_or_else(|| bad("absolute and not in the store dir"))?;
        let mut comps = rest.split(|&b| b == b'/').filter(meaningful).peekable();
        if comps.peek().is_none() {
            return Err(bad("is the store dir itself"));
        }
        if comps.any(|c| c == b"..") {
            return Err(bad("contains `..`"));
        }
        return Ok(());
    }
    if at.is_empty() {
        // A relative root symlink resolves next to the unpacked tree, not inside it.
        return Err(bad("relative target on the archive root"));
    }
    // The link's own directory is `at` minus its last name.
    let depth = at.len().saturating_sub(1);
    let mut ups = 0usize;
    let mut past_ups = false;
    for c in target.split(|&b| b == b'/').filter(meaningful) {
        if c == b".." {
            if past_ups {
                return Err(bad("`..` after another component"));
            }
            ups += 1;
            if ups > depth {
                return Err(bad("escapes the archive root"));
            }
        } else {
            past_ups = true;
        }
    }
    Ok(())
}

/// After `"(" "type"`: one node. Returns true for a directory, whose entries and closing
/// `")"` the caller reads.
fn parse_node_body<R: Read>(
    input: &mut Input<R>,
    sink: &mut impl Sink,
    policy: Option<&UnpackPolicy>,
    at: &[Vec<u8>],
) -> Result<bool, NarError> {
    input.expect("(", at)?;
    input.expect("type", at)?;
    let offset = input.offset;
    let kind = input.read_string(MAX_KEYWORD, at)?;
    match kind.as_slice() {
        b"regular" => {
            let offset = input.offset;
            let mut tok = input.read_string(MAX_KEYWORD, at)?;
            let executable = tok == b"executable";
            if executable {
                input.expect("", at)?;
                tok = input.read_string(MAX_KEYWORD, at)?;
            }
            if tok != b"contents" {
                return Err(NarError::UnexpectedToken {
                    path: show(at),
                    offset,
                    expected: "`executable` or `contents`",
                    found: lossy_prefix(&tok),
                });
            }
            let len = input.read_u64(at)?;
            if let Some(limit) = input.limit {
                if len > limit - input.offset {
                    return Err(NarError::SizeMismatch {
                        expected: limit,
                        actual: input.offset.saturating_add(len),
                        more: true,
                    });
                }
            }
            sink.begin_file(at, executable)?;
            let mut buf = vec![0u8; CHUNK];
            let mut left = len;
            while left > 0 {
                let n = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
                let Some(chunk) = buf.get_mut(..n) else {
                    break;
                };
                input.fill(chunk, at)?;
                sink.file_data(chunk)?;
                left -= n as u64;
            }
            input.read_padding(len, at)?;
            sink.end_file()?;
            input.expect(")", at)?;
            Ok(false)
        }
        b"symlink" => {
            input.expect("target", at)?;
            let target = input.read_string(MAX_TARGET_LEN, at)?;
            if let Some(policy) = policy {
                check_symlink(at, &target, policy)?;
            } else if target.is_empty() || target.contains(&0) {
                return Err(NarError::BadSymlink {
                    path: show(at),
                    target: lossy_prefix(&target),
                    reason: "empty or contains NUL",
                });
            }
            sink.symlink(at, &target)?;
            input.expect(")", at)?;
            Ok(false)
        }
        b"directory" => {
            sink.begin_dir(at)?;
            Ok(true)
        }
        other => Err(NarError::UnexpectedToken {
            path: show(at),
            offset,
            expected: "`regular`, `symlink` or `directory`",
            found: lossy_prefix(other),
        }),
    }
}

/// Parses a whole NAR from `input` into `sink`, iteratively (no recursion on hostile depth).
fn parse<R: Read>(
    input: &mut Input<R>,
    sink: &mut impl Sink,
    policy: Option<&UnpackPolicy>,
) -> Result<(), NarError> {
    let mut at: Comps = Vec::new();
    match input.read_string(MAX_KEYWORD, &at) {
        Ok(m) if m == MAGIC => {}
        Ok(_) | Err(NarError::StringTooLong { .. }) | Err(NarError::BadPadding { .. }) => {
            return Err(NarError::BadMagic)
        }
        Err(e) => return Err(e),
    }
    // One entry per open directory: the last name seen in it.
    let mut open: Vec<Option<Vec<u8>>> = Vec::new();
    if parse_node_body(input, sink, policy, &at)? {
        open.push(None);
    }
    while !open.is_empty() {
        let offset = input.offset;
        let tok = input.read_string(MAX_KEYWORD, &at)?;
        match tok.as_slice() {
            b")" => {
                sink.end_dir(&at)?;
                open.pop();
                if !open.is_empty() {
                    at.pop();
                    input.expect(")", &at)?;
                }
            }
            b"entry" => {
                input.expect("(", &at)?;
                input.expect("name", &at)?;
                let name = input.read_string(MAX_NAME_LEN, &at)?;
                check_name(&name, &at)?;
                if let Some(last) = open.last_mut() {
                    if last.as_ref().is_some_and(|prev| name <= *prev) {
                        return Err(NarError::NotSorted {
                            path: show(&at),
                            name: lossy_prefix(&name),
                        });
                    }
                    *last = Some(name.clone());
                }
                input.expect("node", &at)?;
                at.push(name);
                if parse_node_body(input, sink, policy, &at)? {
                    if open.len() >= MAX_DEPTH {
                        return Err(NarError::TooDeep {
                            path: show(&at),
                            max: MAX_DEPTH,
                        });
                    }
                    open.push(None);
                } else {
                    at.pop();
                    input.expect(")", &at)?;
                }
            }
            other => {
                return Err(NarError::UnexpectedToken {
                    path: show(&at),
                    offset,
                    expected: "`entry` or `)`",
                    found: lossy_prefix(other),
                })
            }
        }
    }
    Ok(())
}

/// Parses and checks a whole NAR stream, then checks for trailing data, size and hash.
fn run<R: Read>(
    reader: R,
    sink: &mut impl Sink,
    expect: Option<(NarHash, u64)>,
    policy: Option<&UnpackPolicy>,
) -> Result<NarSummary, NarError> {
    let mut input = Input {
        inner: BufReader::with_capacity(CHUNK, reader),
        hasher: Sha256::new(),
        offset: 0,
        limit: expect.map(|(_, size)| size),
    };
    parse(&mut input, sink, policy)?;
    if input.has_more()? {
        return Err(NarError::TrailingData {
            offset: input.offset,
        });
    }
    let summary = NarSummary {
        hash: NarHash(input.hasher.finalize().into()),
        size: input.offset,
    };
    if let Some((hash, size)) = expect {
        if summary.size != size {
            return Err(NarError::SizeMismatch {
                expected: size,
                actual: summary.size,
                more: false,
            });
        }
        if summary.hash != hash {
            return Err(NarError::HashMismatch {
                expected: hash,
                actual: summary.hash,
            });
        }
    }
    Ok(summary)
}

/// Checks that `reader` holds exactly one canonical NAR (and, with `expect`, that it has that
/// hash and size) without writing anything. Symlink targets are not checked against an
/// [`UnpackPolicy`] beyond being non-empty and NUL-free.
pub fn verify_nar(
    reader: impl Read,
    expect: Option<(NarHash, u64)>,
) -> Result<NarSummary, NarError> {
    run(reader, &mut NullSink, expect, None)
}

/// Writes the tree, never following a symlink: every file is created with `O_EXCL`, every
/// directory freshly, each inside a directory this sink just created.
struct FsSink {
    dest: PathBuf,
    root_created: bool,
    file: Option<(File, PathBuf, bool)>,
}

impl FsSink {
    fn path(&self, at: &[Vec<u8>]) -> PathBuf {
        let mut p = self.dest.clone();
        for c in at {
            p.push(OsStr::from_bytes(c));
        }
        p
    }

    fn created(&mut self, at: &[Vec<u8>], path: &Path, r: io::Result<()>) -> Result<(), NarError> {
        match r {
            Ok(()) => {
                if at.is_empty() {
                    self.root_created = true;
                }
                Ok(())
            }
            Err(e) if at.is_empty() && e.kind() == io::ErrorKind::AlreadyExists => {
                Err(NarError::DestinationExists(path.to_owned()))
            }
            Err(source) => Err(NarError::Write {
                path: path.to_owned(),
                source,
            }),
        }
    }
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> NarError + '_ {
    move |source| NarError::Write {
        path: path.to_owned(),
        source,
    }
}

fn nix_mtime() -> SystemTime {
    SystemTime::UNIX_EPOCH + NIX_MTIME
}

impl Sink for FsSink {
    fn begin_file(&mut self, at: &[Vec<u8>], executable: bool) -> Result<(), NarError> {
        let path = self.path(at);
        let r = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path);
        match r {
            Ok(f) => {
                self.created(at, &path, Ok(()))?;
                self.file = Some((f, path, executable));
                Ok(())
            }
            Err(e) => self.created(at, &path, Err(e)),
        }
    }

    fn file_data(&mut self, data: &[u8]) -> Result<(), NarError> {
        if let Some((f, path, _)) = self.file.as_mut() {
            f.write_all(data).map_err(write_err(path))?;
        }
        Ok(())
    }

    fn end_file(&mut self) -> Result<(), NarError> {
        if let Some((f, path, executable)) = self.file.take() {
            let mode = if executable { 0o555 } else { 0o444 };
            f.set_modified(nix_mtime()).map_err(write_err(&path))?;
            f.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(write_err(&path))?;
        }
        Ok(())
    }

    fn symlink(&mut self, at: &[Vec<u8>], target: &[u8]) -> Result<(), NarError> {
        let path = self.path(at);
        let r = std::os::unix::fs::symlink(OsStr::from_bytes(target), &path);
        self.created(at, &path, r)
    }

    fn begin_dir(&mut self, at: &[Vec<u8>]) -> Result<(), NarError> {
        let path = self.path(at);
        let r = fs::create_dir(&path);
        self.created(at, &path, r)
    }

    fn end_dir(&mut self, at: &[Vec<u8>]) -> Result<(), NarError> {
        let path = self.path(at);
        // Opening a directory with O_RDONLY does not follow anything we did not create.
        File::open(&path)
            .and_then(|d| d.set_modified(nix_mtime()))
            .map_err(write_err(&path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o555)).map_err(write_err(&path))
    }
}

/// Removes a tree this module wrote, making read-only directories writable first. Never
/// follows symlinks.
fn remove_tree(path: &Path) -> io::Result<()> {
    let md = fs::symlink_metadata(path)?;
    if md.is_dir() {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
        for entry in fs::read_dir(path)? {
            remove_tree(&entry?.path())?;
        }
        fs::remove_dir(path)
    } else {
        fs::remove_file(path)
    }
}

/// Unpacks the NAR read from `reader` to `dest`, which must not exist (its parent must).
/// The NAR's root becomes `dest`: a regular file, a symlink or a directory.
///
/// The NAR must be canonical (see the module docs), its symlinks must satisfy `policy`, and
/// with `expect` it must have exactly that hash and size; the hash is computed while reading
/// and checked at the end. On any error, whatever was written to `dest` is removed.
///
/// Files get mode 0444, or 0555 if executable; directories 0555 once their contents are
/// written; files and directories get mtime 1 like in the Nix store.
pub fn unpack_nar(
    reader: impl Read,
    dest: &Path,
    expect: Option<(NarHash, u64)>,
    policy: &UnpackPolicy,
) -> Result<NarSummary, NarError> {
    if fs::symlink_metadata(dest).is_ok() {
        return Err(NarError::DestinationExists(dest.to_owned()));
    }
    let mut sink = FsSink {
        dest: dest.to_owned(),
        root_created: false,
        file: None,
    };
    let result = run(reader, &mut sink, expect, Some(policy));
    if result.is_err() {
        drop(sink.file.take());
        if sink.root_created {
            // Best effort: the parse error is the one worth reporting.
            let _ = remove_tree(dest);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> UnpackPolicy {
        UnpackPolicy::default()
    }

    fn comps(path: &[&str]) -> Comps {
        path.iter().map(|c| c.as_bytes().to_vec()).collect()
    }

    #[test]
    fn symlink_rules() {
        let ok = |at: &[&str], t: &str| check_symlink(&comps(at), t.as_bytes(), &policy()).is_ok();
        assert!(ok(&["l"], "x"));
        assert!(!ok(&[], "x"));
        assert!(ok(&[], "/nix/store/9piy22i3gmh1lamfrkhwf38z6bbswzvm-a"));
        assert!(ok(&["l"], "./x/y"));
        assert!(ok(&["a", "l"], "../x"));
        assert!(ok(&["a", "b", "l"], "../../x"));
        assert!(ok(&["a", "b", "l"], ".././../x"));
        assert!(ok(
            &["l"],
            "/nix/store/9piy22i3gmh1lamfrkhwf38z6bbswzvm-a/bin/sh"
        ));
        assert!(!ok(&["l"], ".."));
        assert!(!ok(&[], "x/.."));
        assert!(!ok(&["l"], "../x"));
        assert!(!ok(&["a", "l"], "../../x"));
        assert!(!ok(&["a", "l"], "x/../y"));
        assert!(!ok(&["l"], "/etc/passwd"));
        assert!(!ok(&["l"], "/nix/store"));
        assert!(!ok(&["l"], "/nix/store/"));
        assert!(!ok(&["l"], "/nix/storex/a"));
        assert!(!ok(&["l"], "/nix/store/a/../../etc"));
        assert!(!ok(&["l"], ""));
        assert!(!ok(&["l"], "a\0b"));
    }
}
