//! Writes the fuzz targets' seeds, `fuzz/corpus/<target>/seed-*`: real inputs, encoded by
//! the code itself or taken from the repo's fixtures. Run it by hand when a format changes,
//! then let `scripts/fuzz.sh --minimize` fold the seeds into the minimized corpus:
//!
//! `cargo test -p blixard-tests --test fuzz_seeds -- --ignored`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// raft-rs's protobuf messages are built field by field.
#![allow(clippy::field_reassign_with_default)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use blixard_core::{
    encode_versioned, Capacity, ClusterId, Command, EndpointKey, Envelope, NewMember, NodeId, State,
};
use blixard_images::manifest::{Entry, Manifest, MANIFEST_VERSION};
use blixard_net::api::{self, Request, RequestFrame, ResponseItem};
use blixard_net::frame::encode;
use blixard_net::raft_transport::{Hello, RaftFrame, Refusal};
use blixard_net::ticket::JoinTicket;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry as LogEntry, EntryType, Message,
    MessageType, Snapshot,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = root().join("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn copy(target: &str, from: &str) {
    let path = root().join(from);
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    write(target, &name, &std::fs::read(&path).unwrap());
}

fn body<T: serde::Serialize>(v: &T) -> Vec<u8> {
    encode(v).unwrap()[4..].to_vec()
}

fn member() -> NewMember {
    NewMember {
        name: "n1".into(),
        endpoint: EndpointKey([7; 32]),
        addrs: vec!["127.0.0.1:7000".parse().unwrap()],
        labels: BTreeMap::from([("zone".into(), "a".into())]),
        capacity: Capacity {
            vcpus: 4,
            memory_mib: 4096,
        },
    }
}

/// A state with a cluster and its first member.
fn small_state() -> State {
    let mut state = State::new();
    let _ = state.apply_entry(&Command::Bootstrap {
        cluster_id: ClusterId([3; 16]),
        name: "c".into(),
        member: member(),
        admin: EndpointKey([8; 32]),
        now_ms: 1,
    });
    state
}

fn envelope(command: Command) -> Vec<u8> {
    encode_versioned(&Envelope {
        proposer: Some(NodeId(1)),
        request_id: 42,
        command,
    })
}

fn api_frame() {
    let requests: Vec<Request> = vec![
        api::StatusRequest { stale: true }.into(),
        api::TokenCreate { ttl_secs: 3600 }.into(),
        api::MetaSet {
            key: "owner".into(),
            value: Some("ops".into()),
        }
        .into(),
        api::ImagePull {
            name: "web".into(),
            node: Some(NodeId(2)),
        }
        .into(),
        api::UserAdd {
            name: "alice".into(),
            key: EndpointKey([9; 32]),
            roles: vec!["viewer".into()],
            tenant: Some("acme".into()),
        }
        .into(),
    ];
    let mut wire = Vec::new();
    for (i, r) in requests.into_iter().enumerate() {
        let frame = RequestFrame::new(Some(ClusterId([3; 16])), r);
        write("api_frame", &format!("request-{i}"), &body(&frame));
        wire.extend(encode(&frame).unwrap());
    }
    write("api_frame", "stream", &wire);
    let done: ResponseItem = ResponseItem::Done(Err(api::ApiError::BadRequest("no".into())));
    write("api_frame", "response", &body(&done));
}

fn raft_frame() {
    let hello = Hello {
        cluster: ClusterId([3; 16]),
        from: NodeId(1),
        to: NodeId(2),
        incarnation: Some(7),
        version: Some(blixard_net::raft_transport::PeerVersion {
            log: blixard_core::LOG_VERSION,
            release: "0.1.0".into(),
        }),
    };
    let mut normal = LogEntry::default();
    normal.index = 5;
    normal.term = 2;
    normal.data = envelope(Command::SetMeta {
        key: "owner".into(),
        value: Some("ops".into()),
    })
    .into();
    let mut cc = ConfChangeV2::default();
    let mut single = ConfChangeSingle::default();
    single.set_change_type(ConfChangeType::AddLearnerNode);
    single.node_id = 3;
    cc.mut_changes().push(single);
    cc.context = envelope(Command::RemoveMember {
        node: NodeId(3),
        now_ms: 1,
    })
    .into();
    let mut conf = LogEntry::default();
    conf.set_entry_type(EntryType::EntryConfChangeV2);
    conf.index = 6;
    conf.term = 2;
    conf.data = cc.write_to_bytes().unwrap().into();
    let mut append = Message::default();
    append.set_msg_type(MessageType::MsgAppend);
    append.from = 1;
    append.to = 2;
    append.term = 2;
    append.mut_entries().push(normal);
    append.mut_entries().push(conf);
    let mut heartbeat = Message::default();
    heartbeat.set_msg_type(MessageType::MsgHeartbeat);
    heartbeat.from = 1;
    heartbeat.to = 2;

    let mut wire = encode(&hello).unwrap();
    let batch = RaftFrame::Batch(vec![
        append.write_to_bytes().unwrap(),
        heartbeat.write_to_bytes().unwrap(),
    ]);
    wire.extend(encode(&batch).unwrap());
    write("raft_frame", "batch", &wire);

    // A snapshot of a real state, in two chunks.
    let state = small_state();
    let data = encode_versioned(&state.all_rows());
    let mut snap = Snapshot::default();
    snap.mut_metadata().index = 10;
    snap.mut_metadata().term = 2;
    let mut msg = Message::default();
    msg.set_msg_type(MessageType::MsgSnapshot);
    msg.from = 1;
    msg.to = 2;
    msg.set_snapshot(snap);
    let mut wire = encode(&hello).unwrap();
    let (a, b) = data.split_at(data.len() / 2);
    for f in [
        RaftFrame::SnapshotStart {
            message: msg.write_to_bytes().unwrap(),
            len: data.len() as u64,
        },
        RaftFrame::SnapshotChunk(a.to_vec()),
        RaftFrame::SnapshotChunk(b.to_vec()),
        RaftFrame::SnapshotEnd,
    ] {
        wire.extend(encode(&f).unwrap());
    }
    write("raft_frame", "snapshot", &wire);
    let refusal: Result<(), Refusal> = Err(Refusal::NotMember(NodeId(4)));
    write("raft_frame", "refusal", &body(&refusal));
}

fn join_ticket() {
    let t = JoinTicket {
        cluster_id: ClusterId([3; 16]),
        members: vec![
            (
                EndpointKey([4; 32]),
                vec![
                    "127.0.0.1:7001".parse().unwrap(),
                    "[::1]:7001".parse().unwrap(),
                ],
            ),
            (EndpointKey([5; 32]), vec![]),
        ],
        secret: [6; 32],
    };
    write("join_ticket", "ticket", t.to_string().as_bytes());
    write(
        "join_ticket",
        "key",
        EndpointKey([0xab; 32]).to_string().as_bytes(),
    );
    write(
        "join_ticket",
        "cluster",
        ClusterId([0xcd; 16]).to_string().as_bytes(),
    );
    write("join_ticket", "node", b"n12");
}

fn manifest() {
    let entry = |name: &str, refs: Vec<String>, blob: u8| Entry {
        path: format!("/nix/store/{}-{name}", "9piy22i3gmh1lamfrkhwf38z6bbswz0m")
            .replace('0', &blob.to_string()),
        nar_hash: "sha256:1vagcg4r6l6x6w0lj246c0cg1mvd3h5rsaizhfw68mw4sxpdh6cp".into(),
        nar_size: 128,
        references: refs,
        deriver: None,
        blob: iroh_blobs::Hash::new([blob]).to_hex().to_string(),
    };
    let dep = entry("dep", vec![], 1);
    let top = entry("top", vec![dep.path.clone()], 2);
    let m = Manifest {
        version: MANIFEST_VERSION,
        store_dir: "/nix/store".into(),
        root: top.path.clone(),
        entries: vec![dep, top],
    };
    m.check().unwrap();
    write("manifest", "closure", &m.to_bytes().unwrap());
}

fn cache_range() {
    for (i, h) in [
        "bytes=0-99",
        "bytes=100-",
        "bytes=-5",
        "Bytes = 5-9 ",
        "bytes=0-1,5-6",
    ]
    .iter()
    .enumerate()
    {
        let mut input = 1000u64.to_le_bytes().to_vec();
        input[0] = 0; // the size as is (the target shifts it by input[0] % 64)
        input[1] = 4;
        input.extend_from_slice(h.as_bytes());
        write("cache_range", &i.to_string(), &input);
    }
}

fn text_seeds() {
    for f in [
        "crates/images/tests/fixtures/nar/exe.nar",
        "crates/images/tests/fixtures/nar/file.nar",
        "crates/images/tests/fixtures/nar/symlink.nar",
        "crates/images/tests/fixtures/nar/tree.nar",
    ] {
        copy("nar", f);
    }
    for f in [
        "crates/images/tests/fixtures/binary-cache/9piy22i3gmh1lamfrkhwf38z6bbswzvm.narinfo",
        "crates/images/tests/fixtures/binary-cache/nsjxr4a56v2ddmkxgh17309qr30hma21.narinfo",
        "crates/images/tests/fixtures/pathinfo-2.8.json",
        "crates/images/tests/fixtures/test-key.pub",
        "crates/images/tests/fixtures/test-key.sec",
    ] {
        copy("narinfo", f);
    }
    // The README's configuration example, and the module's JSON configs.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let toml = readme
        .split("```toml\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    write("config", "readme.toml", toml.as_bytes());
    for f in [
        "nix/tests/expected/daemon-config-full.json",
        "nix/tests/expected/daemon-config-minimal.json",
    ] {
        copy("config", f);
    }
    copy("node_files", "nix/tests/expected/declared-vms.json");
    let members = format!(
        r#"{{"node1": {{"name": "n1", "endpointId": "{}", "addresses": ["10.0.0.1:7000"]}},
  "node2": {{"name": "n2", "endpointId": "{}", "addresses": []}}}}"#,
        EndpointKey([1; 32]),
        EndpointKey([2; 32])
    );
    write("node_files", "members.json", members.as_bytes());
}

/// A backup of a small real state: the whole file, and the body its checksum covers (the
/// target decodes both).
fn backup() {
    let mut state = small_state();
    let _ = state.apply_entry(&Command::SetMeta {
        key: "owner".into(),
        value: Some("ops".into()),
    });
    let header = blixard_core::backup::BackupHeader {
        cluster_id: ClusterId([3; 16]),
        cluster_name: "c".into(),
        index: 12,
        term: 2,
        created_at_ms: 5,
        node: NodeId(1),
        version: "0.1.0".into(),
    };
    let file = blixard_core::backup::encode(&header, state.all_rows()).unwrap();
    write("backup", "file", &file);
    let body = &file[blixard_core::backup::MAGIC.len() + 2..file.len() - 32];
    write("backup", "body", body);
}

#[test]
#[ignore = "writes fuzz/corpus; run by hand"]
fn write_fuzz_seeds() {
    backup();
    api_frame();
    raft_frame();
    join_ticket();
    manifest();
    cache_range();
    text_seeds();
}
