//! `blixard/raft/1` as a member reads it: the hello, then raft frames (batches of protobuf
//! messages, snapshots in chunks), and what the state machine decodes from them (log
//! entries' commands and conf changes, snapshot rows). The sender's side, the hello's
//! answer, too.
#![no_main]

use blixard_core::{decode_versioned, Envelope, NodeId, Row, State};
use blixard_fuzz::now;
use blixard_net::frame::{decode, Reader};
use blixard_net::raft_transport::{Hello, Inbound, Refusal};
use libfuzzer_sys::fuzz_target;
use protobuf::Message as _;
use raft::eraftpb::{ConfChangeV2, EntryType, Message};

fn replicated(msg: &Message) {
    for entry in msg.get_entries() {
        match entry.get_entry_type() {
            EntryType::EntryNormal => {
                if let Ok(env) = decode_versioned::<Envelope>(&entry.data) {
                    let _ = State::new().apply_entry(&env.command);
                }
            }
            EntryType::EntryConfChangeV2 => {
                if let Ok(cc) = ConfChangeV2::parse_from_bytes(&entry.data) {
                    let _ = decode_versioned::<Envelope>(&cc.context);
                }
            }
            EntryType::EntryConfChange => {}
        }
    }
    if msg.has_snapshot() {
        if let Ok(rows) = decode_versioned::<Vec<Row>>(&msg.get_snapshot().data) {
            let _ = State::from_rows(rows.iter().map(|r| {
                (
                    r.table.as_str(),
                    r.key.as_slice(),
                    r.value.as_deref().unwrap_or_default(),
                )
            }));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = decode::<Result<(), Refusal>>(data);
    let mut reader = Reader::new(data);
    let Some(Ok(hello)) = now(reader.read::<Hello>()) else {
        return;
    };
    let mut inbound = Inbound::new(hello.from, NodeId(hello.to.0));
    for _ in 0..256 {
        let Some(Ok(Some(body))) = now(reader.read_raw()) else {
            return;
        };
        match inbound.frame(&body) {
            Ok(msgs) => msgs.iter().for_each(replicated),
            Err(_) => return,
        }
    }
});
