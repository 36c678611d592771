//! Nix formats against fixtures made by real Nix 2.8 (see `fixtures/regen.sh`), hostile NARs,
//! property tests, and (when `nix` is on PATH) live interop with Nix.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::OsStr;
use std::fs;
use std::io::Cursor;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use blixard_images::nix::{
    dump_path, make_source_path, parse_path_info_json, unpack_nar, verify_nar, NarError, NarHash,
    NarInfo, NarSummary, PublicKey, SigningKey, StoreDir, StorePath, UnpackPolicy,
};
use proptest::prelude::*;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn read_fixture(rel: &str) -> Vec<u8> {
    fs::read(fixture(rel)).unwrap()
}

/// `nix-store --add` of the fixture tree (Nix 2.8).
const TREE_SOURCE_PATH: &str = "/nix/store/17ja4s446xriqdv87khgnmd3yqrwcqmb-tree";
/// The `ca` field Nix 2.8 recorded for that path: its NAR hash.
const TREE_NAR_HASH: &str = "sha256:0hhl8xjxp0f8zs3sfv6f4clmgifgwgs9ziffh21j2n2gfyxxcq2l";
const DEP: &str = "/nix/store/9piy22i3gmh1lamfrkhwf38z6bbswzvm-blixard-fixture-dep";
const TOP: &str = "/nix/store/nsjxr4a56v2ddmkxgh17309qr30hma21-blixard-fixture-top";

/// The same tree as `fixtures/regen.sh` builds.
fn make_fixture_tree(t: &Path) {
    fs::create_dir_all(t.join("sub/deeper")).unwrap();
    fs::create_dir_all(t.join("empty-dir")).unwrap();
    fs::write(t.join("hello.txt"), "hello\n").unwrap();
    fs::write(t.join("empty"), "").unwrap();
    fs::write(t.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(t.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(t.join("sub/nine-bytes"), "abcdefghi").unwrap();
    fs::write(t.join("sub/deeper/we?ird+na=me_1.0-x"), "x").unwrap();
    std::os::unix::fs::symlink("../hello.txt", t.join("sub/link-rel")).unwrap();
    std::os::unix::fs::symlink(
        "/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-missing",
        t.join("link-abs"),
    )
    .unwrap();
    fs::write(t.join("B-upper"), "B").unwrap();
    fs::write(t.join("eight"), "12345678").unwrap();
    fs::write(t.join("café"), "u").unwrap();
    fs::write(t.join(OsStr::from_bytes(b"raw\xff")), "r").unwrap();
}

fn dump(path: &Path) -> (Vec<u8>, NarSummary) {
    let mut out = Vec::new();
    let summary = dump_path(path, &mut out).unwrap();
    (out, summary)
}

fn policy() -> UnpackPolicy {
    UnpackPolicy::default()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Makes a tree this test unpacked removable again (unpacked dirs are 0555).
fn make_writable(p: &Path) {
    let md = fs::symlink_metadata(p).unwrap();
    if md.is_dir() {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
        for e in fs::read_dir(p).unwrap() {
            make_writable(&e.unwrap().path());
        }
    }
}

struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        Sandbox {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn dest(&self) -> PathBuf {
        self.dir.path().join("out")
    }
    fn is_empty(&self) -> bool {
        entries(self.dir.path()).is_empty()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if fs::symlink_metadata(self.dest()).is_ok() {
            make_writable(&self.dest());
        }
    }
}

// --- NAR writing ---------------------------------------------------------------------------

#[test]
fn dump_is_byte_identical_to_nix_store_dump() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("tree");
    make_fixture_tree(&t);
    let (nar, summary) = dump(&t);
    assert_eq!(nar, read_fixture("nar/tree.nar"));
    assert_eq!(summary.size, nar.len() as u64);
    assert_eq!(summary.hash, NarHash::digest(&nar));
    assert_eq!(summary.hash, NarHash::parse(TREE_NAR_HASH).unwrap());

    assert_eq!(dump(&t.join("hello.txt")).0, read_fixture("nar/file.nar"));
    assert_eq!(dump(&t.join("run.sh")).0, read_fixture("nar/exe.nar"));
    assert_eq!(
        dump(&t.join("sub/link-rel")).0,
        read_fixture("nar/symlink.nar")
    );
}

#[test]
fn source_path_matches_nix_store_add() {
    let store = StoreDir::default();
    let hash = NarHash::parse(TREE_NAR_HASH).unwrap();
    let p = make_source_path(&store, "tree", &hash).unwrap();
    assert_eq!(p.to_absolute(&store), TREE_SOURCE_PATH);
    assert_eq!(p.hash_part(), "17ja4s446xriqdv87khgnmd3yqrwcqmb");
    assert!(make_source_path(&store, ".bad", &hash).is_err());
}

// --- NAR reading ---------------------------------------------------------------------------

#[test]
fn unpack_roundtrips_fixture_with_nix_modes() {
    let nar = read_fixture("nar/tree.nar");
    let sb = Sandbox::new();
    let summary = unpack_nar(
        Cursor::new(&nar),
        &sb.dest(),
        Some((NarHash::digest(&nar), nar.len() as u64)),
        &policy(),
    )
    .unwrap();
    assert_eq!(summary.size, nar.len() as u64);
    assert_eq!(dump(&sb.dest()).0, nar);

    let mode = |p: &str| {
        fs::symlink_metadata(sb.dest().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode(""), 0o555);
    assert_eq!(mode("sub"), 0o555);
    assert_eq!(mode("hello.txt"), 0o444);
    assert_eq!(mode("run.sh"), 0o555);
    for p in ["", "sub", "hello.txt", "run.sh", "empty-dir"] {
        assert_eq!(
            fs::symlink_metadata(sb.dest().join(p)).unwrap().mtime(),
            1,
            "{p}"
        );
    }
    assert_eq!(
        fs::read_link(sb.dest().join("sub/link-rel")).unwrap(),
        Path::new("../hello.txt")
    );
    assert_eq!(verify_nar(Cursor::new(&nar), None).unwrap(), summary);
}

#[test]
fn unpack_single_file_and_symlink_roots() {
    for (name, kind) in [("nar/file.nar", "file"), ("nar/exe.nar", "exe")] {
        let nar = read_fixture(name);
        let sb = Sandbox::new();
        unpack_nar(Cursor::new(&nar), &sb.dest(), None, &policy()).unwrap();
        let md = fs::symlink_metadata(sb.dest()).unwrap();
        assert!(md.is_file(), "{kind}");
        assert_eq!(dump(&sb.dest()).0, nar);
    }
    // The fixture symlink is relative, which the root may not be.
    let nar = read_fixture("nar/symlink.nar");
    let sb = Sandbox::new();
    let err = unpack_nar(Cursor::new(&nar), &sb.dest(), None, &policy()).unwrap_err();
    assert!(
        matches!(err, NarError::BadSymlink { ref path, .. } if path == "/"),
        "{err}"
    );
    assert!(sb.is_empty());
    // verify_nar checks structure only.
    verify_nar(Cursor::new(&nar), None).unwrap();
}

#[test]
fn unpack_refuses_existing_destination() {
    let nar = read_fixture("nar/file.nar");
    let sb = Sandbox::new();
    fs::write(sb.dest(), "precious").unwrap();
    let err = unpack_nar(Cursor::new(&nar), &sb.dest(), None, &policy()).unwrap_err();
    assert!(matches!(err, NarError::DestinationExists(_)), "{err}");
    assert_eq!(fs::read_to_string(sb.dest()).unwrap(), "precious");
    // A dangling symlink counts as existing too.
    let sb = Sandbox::new();
    std::os::unix::fs::symlink(sb.dir.path().join("elsewhere"), sb.dest()).unwrap();
    let err = unpack_nar(Cursor::new(&nar), &sb.dest(), None, &policy()).unwrap_err();
    assert!(matches!(err, NarError::DestinationExists(_)), "{err}");
    assert!(!sb.dir.path().join("elsewhere").exists());
}

/// Hand-built NARs.
#[derive(Default)]
struct Nar(Vec<u8>);

impl Nar {
    fn s(mut self, tok: &[u8]) -> Self {
        self.0.extend_from_slice(&(tok.len() as u64).to_le_bytes());
        self.0.extend_from_slice(tok);
        let pad = (8 - tok.len() % 8) % 8;
        self.0.extend(std::iter::repeat_n(0u8, pad));
        self
    }
    fn toks(mut self, toks: &[&str]) -> Self {
        for t in toks {
            self = self.s(t.as_bytes());
        }
        self
    }
    fn start() -> Self {
        Nar::default().toks(&["nix-archive-1"])
    }
    fn dir_start() -> Self {
        Nar::start().toks(&["(", "type", "directory"])
    }
    fn file_entry(self, name: &[u8], contents: &[u8]) -> Self {
        self.toks(&["entry", "(", "name"])
            .s(name)
            .toks(&["node", "(", "type", "regular", "contents"])
            .s(contents)
            .toks(&[")", ")"])
    }
    fn symlink_entry(self, name: &[u8], target: &[u8]) -> Self {
        self.toks(&["entry", "(", "name"])
            .s(name)
            .toks(&["node", "(", "type", "symlink", "target"])
            .s(target)
            .toks(&[")", ")"])
    }
    fn end(self) -> Vec<u8> {
        self.toks(&[")"]).0
    }
}

fn reject(nar: &[u8]) -> NarError {
    reject_expect(nar, None)
}

fn reject_expect(nar: &[u8], expect: Option<(NarHash, u64)>) -> NarError {
    let sb = Sandbox::new();
    let err = unpack_nar(Cursor::new(nar), &sb.dest(), expect, &policy()).unwrap_err();
    assert!(
        sb.is_empty(),
        "left {:?} after {err}",
        entries(sb.dir.path())
    );
    err
}

#[test]
fn builder_makes_valid_nars() {
    let nar = Nar::dir_start()
        .file_entry(b"a", b"1")
        .symlink_entry(b"b", b"a")
        .end();
    let sb = Sandbox::new();
    unpack_nar(Cursor::new(&nar), &sb.dest(), None, &policy()).unwrap();
    assert_eq!(dump(&sb.dest()).0, nar);
}

#[test]
fn rejects_bad_names() {
    for name in [&b".."[..], b".", b"", b"a/b", b"../x", b"a\0b"] {
        let nar = Nar::dir_start().file_entry(name, b"evil").end();
        let err = reject(&nar);
        assert!(
            matches!(err, NarError::BadName { ref path, .. } if path == "/"),
            "{err}"
        );
    }
    // Nested: the error names the directory.
    let nar = Nar::dir_start()
        .toks(&[
            "entry",
            "(",
            "name",
            "sub",
            "node",
            "(",
            "type",
            "directory",
        ])
        .file_entry(b"ok", b"")
        .file_entry(b"..", b"evil")
        .toks(&[")", ")"])
        .end();
    let err = reject(&nar);
    assert!(
        matches!(err, NarError::BadName { ref path, .. } if path == "/sub"),
        "{err}"
    );
}

#[test]
fn rejects_escaping_symlinks() {
    for target in [
        &b"../x"[..],
        b"/etc/passwd",
        b"/nix/store/../etc",
        b"a/../../x",
        b"",
    ] {
        let nar = Nar::dir_start().symlink_entry(b"l", target).end();
        let err = reject(&nar);
        assert!(
            matches!(err, NarError::BadSymlink { ref path, .. } if path == "/l"),
            "{err}"
        );
    }
    // Root symlink: only into the store.
    let root = |t: &[u8]| {
        Nar::start()
            .toks(&["(", "type", "symlink", "target"])
            .s(t)
            .end()
    };
    reject(&root(b"x"));
    reject(&root(b"/etc"));
    let sb = Sandbox::new();
    unpack_nar(
        Cursor::new(root(b"/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-x/bin")),
        &sb.dest(),
        None,
        &policy(),
    )
    .unwrap();
    // Another store dir.
    let other = UnpackPolicy {
        store_dir: StoreDir::new("/var/blixard/store").unwrap(),
    };
    let sb = Sandbox::new();
    let err = unpack_nar(Cursor::new(root(b"/nix/store/a")), &sb.dest(), None, &other).unwrap_err();
    assert!(matches!(err, NarError::BadSymlink { .. }), "{err}");
    unpack_nar(
        Cursor::new(root(b"/var/blixard/store/a")),
        &sb.dest(),
        None,
        &other,
    )
    .unwrap();
}

#[test]
fn rejects_duplicate_and_unsorted_entries() {
    let dup = Nar::dir_start()
        .file_entry(b"a", b"1")
        .file_entry(b"a", b"2")
        .end();
    assert!(matches!(reject(&dup), NarError::NotSorted { ref name, .. } if name == "a"));
    let unsorted = Nar::dir_start()
        .file_entry(b"b", b"1")
        .file_entry(b"a", b"2")
        .end();
    assert!(matches!(reject(&unsorted), NarError::NotSorted { ref name, .. } if name == "a"));
    // Sorting is bytewise: "B" < "a".
    let wrong_case = Nar::dir_start()
        .file_entry(b"a", b"1")
        .file_entry(b"B", b"2")
        .end();
    assert!(matches!(reject(&wrong_case), NarError::NotSorted { .. }));
}

#[test]
fn rejects_every_truncation() {
    let nar = read_fixture("nar/tree.nar");
    let expect = Some((NarHash::digest(&nar), nar.len() as u64));
    for len in 0..nar.len() {
        let cut = &nar[..len];
        let err = reject(cut);
        assert!(
            matches!(err, NarError::Truncated { .. } | NarError::BadMagic),
            "at {len}: {err}"
        );
        let err = reject_expect(cut, expect);
        assert!(
            matches!(err, NarError::Truncated { .. } | NarError::BadMagic),
            "at {len}: {err}"
        );
        assert!(verify_nar(Cursor::new(cut), None).is_err());
    }
}

#[test]
fn rejects_size_hash_and_trailing_mismatches() {
    let nar = read_fixture("nar/tree.nar");
    let hash = NarHash::digest(&nar);
    let len = nar.len() as u64;
    assert!(matches!(
        reject_expect(&nar, Some((hash, len + 8))),
        NarError::SizeMismatch { expected, actual, more: false } if expected == len + 8 && actual == len
    ));
    assert!(matches!(
        reject_expect(&nar, Some((hash, len - 8))),
        NarError::SizeMismatch { more: true, .. }
    ));
    assert!(matches!(
        reject_expect(&nar, Some((NarHash([7; 32]), len))),
        NarError::HashMismatch { actual, .. } if actual == hash
    ));
    let mut longer = nar.clone();
    longer.push(0);
    assert!(matches!(reject(&longer), NarError::TrailingData { offset } if offset == len));
    assert!(matches!(
        reject_expect(&longer, Some((hash, len))),
        NarError::TrailingData { .. }
    ));
    longer.extend_from_slice(&nar);
    assert!(matches!(reject(&longer), NarError::TrailingData { .. }));
    assert!(verify_nar(Cursor::new(&longer), None).is_err());
}

#[test]
fn rejects_malformed_tokens() {
    assert!(matches!(reject(b""), NarError::Truncated { .. }));
    assert!(matches!(
        reject(&Nar::default().toks(&["nix-archive-2"]).0),
        NarError::BadMagic
    ));
    let mut huge = Nar::start()
        .toks(&["(", "type", "directory", "entry", "(", "name"])
        .0;
    huge.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        reject(&huge),
        NarError::StringTooLong { len: u64::MAX, .. }
    ));
    let long_name = Nar::dir_start().file_entry(&[b'a'; 256], b"").end();
    assert!(matches!(reject(&long_name), NarError::StringTooLong { .. }));
    let long_target = Nar::dir_start().symlink_entry(b"l", &[b'a'; 4097]).end();
    assert!(matches!(
        reject(&long_target),
        NarError::StringTooLong { .. }
    ));
    let bad_type = Nar::start().toks(&["(", "type", "fifo", ")"]).0;
    assert!(matches!(
        reject(&bad_type),
        NarError::UnexpectedToken { .. }
    ));
    let exec_value = Nar::start()
        .toks(&[
            "(",
            "type",
            "regular",
            "executable",
            "yes",
            "contents",
            "",
            ")",
        ])
        .0;
    assert!(matches!(
        reject(&exec_value),
        NarError::UnexpectedToken { .. }
    ));
    // Non-zero padding after a 1-byte file.
    let mut nar = Nar::start()
        .toks(&["(", "type", "regular", "contents", "x", ")"])
        .0;
    let pad_at = nar.len() - 16 - 1;
    nar[pad_at] = 1;
    assert!(
        matches!(reject(&nar), NarError::BadPadding { .. }),
        "{}",
        reject(&nar)
    );
    // Claimed contents size beyond the expected NAR size fails before reading on.
    let mut big = Nar::start().toks(&["(", "type", "regular", "contents"]).0;
    big.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let err = reject_expect(&big, Some((NarHash([0; 32]), 4096)));
    assert!(
        matches!(err, NarError::SizeMismatch { more: true, .. }),
        "{err}"
    );
}

#[test]
fn rejects_excessive_depth() {
    let mut n = Nar::dir_start();
    for _ in 0..300 {
        n = n.toks(&["entry", "(", "name", "d", "node", "(", "type", "directory"]);
    }
    let err = reject(&n.0);
    assert!(matches!(err, NarError::TooDeep { .. }), "{err}");
}

#[test]
fn failure_after_writing_removes_everything() {
    // A valid file first, then a bad entry: the file must not survive.
    let nar = Nar::dir_start()
        .toks(&["entry", "(", "name", "a", "node", "(", "type", "directory"])
        .file_entry(b"f", b"data")
        .toks(&[")", ")"])
        .symlink_entry(b"z", b"/etc/shadow")
        .end();
    let err = reject(&nar);
    assert!(matches!(err, NarError::BadSymlink { .. }), "{err}");
}

// --- narinfo, signing, path-info -----------------------------------------------------------

#[test]
fn narinfo_matches_nix_byte_for_byte_including_signature() {
    let store = StoreDir::default();
    let key =
        SigningKey::from_nix_secret(&String::from_utf8(read_fixture("test-key.sec")).unwrap())
            .unwrap();
    let public =
        PublicKey::parse(&String::from_utf8(read_fixture("test-key.pub")).unwrap()).unwrap();
    assert_eq!(key.public_key(), public);
    for path in [DEP, TOP] {
        let sp = StorePath::from_absolute(path, &store).unwrap();
        let text = String::from_utf8(read_fixture(&format!(
            "binary-cache/{}.narinfo",
            sp.hash_part()
        )))
        .unwrap();
        let info = NarInfo::parse(&text, &store).unwrap();
        assert_eq!(info.store_path, sp);
        assert_eq!(info.compression, "none");
        assert_eq!(info.render(&store), text);
        assert!(info.has_valid_signature(&store, std::slice::from_ref(&public)));

        // ed25519 is deterministic: our signature equals the one Nix wrote.
        let mut ours = info.clone();
        ours.signatures.clear();
        ours.sign(&key, &store);
        assert_eq!(ours.signatures, info.signatures);

        let other = SigningKey::generate("blixard-test-1").unwrap().public_key();
        assert!(!info.has_valid_signature(&store, &[other]));
        let mut tampered = info.clone();
        tampered.nar_size += 1;
        assert!(!tampered.has_valid_signature(&store, std::slice::from_ref(&public)));

        // The NAR file the narinfo points to.
        let nar = read_fixture(&format!("binary-cache/{}", info.url));
        let summary = verify_nar(Cursor::new(&nar), Some((info.nar_hash, info.nar_size))).unwrap();
        assert_eq!(info.url, format!("nar/{}.nar", summary.hash.to_base32()));
    }
}

#[test]
fn narinfo_fingerprint_and_parse_rules() {
    let store = StoreDir::default();
    let text = String::from_utf8(read_fixture(
        "binary-cache/nsjxr4a56v2ddmkxgh17309qr30hma21.narinfo",
    ))
    .unwrap();
    let info = NarInfo::parse(&text, &store).unwrap();
    assert_eq!(
        info.fingerprint(&store),
        format!("1;{TOP};sha256:1y1m2cgj5filsdvz0v7zr8bmx297kyc6dss71lcy91my6mkpqh7y;176;{DEP}")
    );
    // Nix defaults Compression to bzip2 and ignores unknown keys.
    let minimal = format!(
        "StorePath: {TOP}\nURL: x\nNarHash: {}\nNarSize: 1\nSystem: x86_64-linux\nCA: whatever\n",
        info.nar_hash
    );
    let parsed = NarInfo::parse(&minimal, &store).unwrap();
    assert_eq!(parsed.compression, "bzip2");
    assert!(parsed.references.is_empty());
    for missing in ["StorePath", "URL", "NarHash", "NarSize"] {
        let without: String = minimal
            .lines()
            .filter(|l| !l.starts_with(missing))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(NarInfo::parse(&without, &store).is_err(), "{missing}");
    }
    assert!(NarInfo::parse(&minimal.replace("NarSize: 1", "NarSize: 0"), &store).is_err());
    assert!(NarInfo::parse(&minimal.replace("/nix/store", "/gnu/store"), &store).is_err());
}

#[test]
fn path_info_json_from_nix_2_8() {
    let store = StoreDir::default();
    let json = String::from_utf8(read_fixture("pathinfo-2.8.json")).unwrap();
    let infos = parse_path_info_json(&json, &store).unwrap();
    assert_eq!(infos.len(), 2);
    let dep = StorePath::from_absolute(DEP, &store).unwrap();
    let top = infos
        .iter()
        .find(|i| i.path.to_absolute(&store) == TOP)
        .unwrap();
    assert_eq!(top.references, vec![dep.clone()]);
    assert_eq!(top.nar_size, 176);
    assert_eq!(
        top.deriver.as_ref().unwrap().base_name(),
        "s4srwdd4xpj4nx6zscb306x5n1lbq0mr-blixard-fixture-top.drv"
    );
    // Same hashes as the narinfo files Nix wrote.
    for i in &infos {
        let text = String::from_utf8(read_fixture(&format!(
            "binary-cache/{}.narinfo",
            i.path.hash_part()
        )))
        .unwrap();
        let ni = NarInfo::parse(&text, &store).unwrap();
        assert_eq!((ni.nar_hash, ni.nar_size), (i.nar_hash, i.nar_size));
        assert_eq!(ni.references, i.references);
    }

    // The object form of newer Nix (keyed by path, SRI or base32 hashes, base names allowed).
    let newer = format!(
        r#"{{"{TOP}": {{"narHash": "{}", "narSize": 176, "references": ["{}"], "deriver": null,
             "signatures": ["k:sig"], "ca": null}},
           "{DEP}": {{"narHash": "{}", "narSize": 128, "references": []}}}}"#,
        top.nar_hash.to_sri(),
        dep.base_name(),
        infos
            .iter()
            .find(|i| i.path == dep)
            .unwrap()
            .nar_hash
            .to_nix_string(),
    );
    let parsed = parse_path_info_json(&newer, &store).unwrap();
    assert_eq!(parsed.len(), 2);
    let ptop = parsed.iter().find(|i| i.path == top.path).unwrap();
    assert_eq!(ptop.references, vec![dep]);
    assert_eq!(ptop.signatures, vec!["k:sig".to_owned()]);
    assert_eq!(ptop.deriver, None);

    // Invalid paths are errors in both forms.
    let invalid = format!(r#"[{{"path": "{TOP}", "valid": false}}]"#);
    assert!(parse_path_info_json(&invalid, &store).is_err());
    assert!(parse_path_info_json(&format!(r#"{{"{TOP}": null}}"#), &store).is_err());
    assert!(parse_path_info_json("42", &store).is_err());
}

// --- properties ----------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Node {
    File(Vec<u8>, bool),
    Link(String),
    Dir(Vec<(String, Node)>),
}

fn name_strategy() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._+=?-]{1,10}".prop_filter("not . or ..", |n| n != "." && n != "..")
}

fn node_strategy() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        (proptest::collection::vec(any::<u8>(), 0..40), any::<bool>())
            .prop_map(|(c, x)| Node::File(c, x)),
        prop_oneof![
            name_strategy(),
            Just("/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-x".to_owned()),
        ]
        .prop_map(Node::Link),
    ];
    leaf.prop_recursive(4, 24, 5, |inner| {
        proptest::collection::btree_map(name_strategy(), inner, 0..5)
            .prop_map(|m| Node::Dir(m.into_iter().collect()))
    })
}

fn materialise(path: &Path, node: &Node) {
    match node {
        Node::File(c, x) => {
            fs::write(path, c).unwrap();
            let mode = if *x { 0o755 } else { 0o644 };
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
        }
        Node::Link(t) => std::os::unix::fs::symlink(t, path).unwrap(),
        Node::Dir(entries) => {
            fs::create_dir(path).unwrap();
            for (n, child) in entries {
                materialise(&path.join(n), child);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_roundtrip(root in prop_oneof![
        node_strategy().prop_filter("no relative root symlink", |n| !matches!(n, Node::Link(t) if !t.starts_with('/'))),
    ]) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        materialise(&src, &root);
        let (nar, summary) = dump(&src);
        prop_assert_eq!(verify_nar(Cursor::new(&nar), Some((summary.hash, summary.size))).unwrap(), summary);
        let sb = Sandbox::new();
        let got = unpack_nar(Cursor::new(&nar), &sb.dest(), Some((summary.hash, summary.size)), &policy()).unwrap();
        prop_assert_eq!(got, summary);
        let (again, _) = dump(&sb.dest());
        prop_assert_eq!(again, nar);
    }

    #[test]
    fn mutated_nars_never_escape(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..4)
    ) {
        let mut nar = read_fixture("nar/tree.nar");
        for (at, byte, op) in edits {
            let i = at.index(nar.len().max(1));
            match op {
                0 | 1 => { if let Some(b) = nar.get_mut(i) { *b = byte } }
                2 => nar.insert(i, byte),
                _ => { nar.truncate(i) }
            }
        }
        let sb = Sandbox::new();
        match unpack_nar(Cursor::new(&nar), &sb.dest(), None, &policy()) {
            Ok(summary) => {
                prop_assert_eq!(entries(sb.dir.path()), vec!["out".to_owned()]);
                let (again, redumped) = dump(&sb.dest());
                prop_assert_eq!(redumped, summary);
                prop_assert_eq!(&again, &nar);
            }
            Err(_) => prop_assert!(sb.is_empty()),
        }
        let _ = verify_nar(Cursor::new(&nar), None);
    }
}

// --- live interop with Nix -----------------------------------------------------------------

fn have_nix() -> bool {
    let found = Command::new("nix")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        println!("skipped: `nix` is not on PATH");
    }
    found
}

fn nix(cmd: &str) -> Command {
    let mut c = Command::new(cmd);
    c.env(
        "NIX_CONFIG",
        "experimental-features = nix-command flakes\nsandbox = false\nbuild-users-group =\nsubstituters =\n",
    );
    c
}

fn run_ok(c: &mut Command) -> Vec<u8> {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn live_dump_and_add_match_nix() {
    if !have_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("live-tree");
    make_fixture_tree(&t);
    fs::write(t.join("sub/big"), vec![0xa5u8; 100_003]).unwrap();
    let theirs = run_ok(nix("nix-store").arg("--dump").arg(&t));
    let (ours, summary) = dump(&t);
    assert_eq!(ours, theirs);

    let store = tmp.path().join("store");
    let added = run_ok(
        nix("nix-store")
            .arg("--store")
            .arg(&store)
            .arg("--add")
            .arg(&t),
    );
    let added = String::from_utf8(added).unwrap();
    let expected = make_source_path(&StoreDir::default(), "live-tree", &summary.hash).unwrap();
    assert_eq!(added.trim(), expected.to_absolute(&StoreDir::default()));
    make_writable(tmp.path());
}

#[test]
fn live_nix_copy_accepts_our_cache_and_signatures() {
    if !have_nix() {
        return;
    }
    let store = StoreDir::default();
    let tmp = tempfile::tempdir().unwrap();
    let sec = tmp.path().join("k.sec");
    let publ = tmp.path().join("k.pub");
    run_ok(
        nix("nix-store")
            .arg("--generate-binary-cache-key")
            .arg("blixard-live-1")
            .arg(&sec)
            .arg(&publ),
    );
    let key = SigningKey::from_nix_secret(&fs::read_to_string(&sec).unwrap()).unwrap();
    assert_eq!(
        key.public_key().to_nix_string(),
        fs::read_to_string(&publ).unwrap().trim()
    );

    // A cache of our own: the fixture closure, NARs under a non-standard URL, our narinfos.
    let cache = tmp.path().join("cache");
    fs::create_dir_all(cache.join("blobs")).unwrap();
    fs::write(cache.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let infos = parse_path_info_json(
        &String::from_utf8(read_fixture("pathinfo-2.8.json")).unwrap(),
        &store,
    )
    .unwrap();
    for i in &infos {
        let nar = read_fixture(&format!("binary-cache/nar/{}.nar", i.nar_hash.to_base32()));
        fs::write(cache.join("blobs").join(i.nar_hash.to_hex()), &nar).unwrap();
        let mut ni = NarInfo {
            store_path: i.path.clone(),
            url: format!("blobs/{}", i.nar_hash.to_hex()),
            compression: "none".to_owned(),
            nar_hash: i.nar_hash,
            nar_size: i.nar_size,
            references: i.references.clone(),
            deriver: i.deriver.clone(),
            signatures: Vec::new(),
        };
        ni.sign(&key, &store);
        fs::write(
            cache.join(format!("{}.narinfo", i.path.hash_part())),
            ni.render(&store),
        )
        .unwrap();
    }

    let copy = |dest: &str, trusted: &str| {
        nix("nix")
            .args(["copy", "--from"])
            .arg(format!("file://{}", cache.display()))
            .arg("--to")
            .arg(tmp.path().join(dest))
            .args(["--option", "trusted-public-keys", trusted])
            .args(["--option", "require-sigs", "true"])
            .arg(TOP)
            .output()
            .unwrap()
    };
    let wrong = SigningKey::generate("blixard-live-1").unwrap().public_key();
    let out = copy("store-wrong", &wrong.to_nix_string());
    assert!(!out.status.success(), "nix copy accepted a wrong key");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lacks a valid signature"), "{stderr}");

    let out = copy("store-ok", &key.public_key().to_nix_string());
    assert!(
        out.status.success(),
        "nix copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // What Nix recorded matches what we served, signatures included.
    let json = run_ok(
        nix("nix")
            .args(["path-info", "--json", "--recursive", "--store"])
            .arg(tmp.path().join("store-ok"))
            .arg(TOP),
    );
    let copied = parse_path_info_json(&String::from_utf8(json).unwrap(), &store).unwrap();
    assert_eq!(copied.len(), 2);
    for c in &copied {
        let orig = infos.iter().find(|i| i.path == c.path).unwrap();
        assert_eq!(
            (c.nar_hash, c.nar_size, &c.references),
            (orig.nar_hash, orig.nar_size, &orig.references)
        );
        assert_eq!(c.signatures.len(), 1, "{:?}", c.signatures);
        assert!(c.signatures[0].starts_with("blixard-live-1:"));
    }
    make_writable(tmp.path());
}
