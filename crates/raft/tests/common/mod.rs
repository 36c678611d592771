//! What the raft crate's test files share.

use std::collections::BTreeMap;

use blixard_core::{Capacity, ClusterId, Command, EndpointKey, NewMember, State};

/// The state a bootstrapped one-member cluster starts from.
pub fn initial_state() -> State {
    let mut state = State::new();
    state
        .apply(&Command::Bootstrap {
            cluster_id: ClusterId([0x5a; 16]),
            name: "sim".into(),
            member: NewMember {
                name: "node1".into(),
                endpoint: EndpointKey([1; 32]),
                addrs: vec![],
                labels: BTreeMap::new(),
                capacity: Capacity {
                    vcpus: 4,
                    memory_mib: 4096,
                },
            },
            admin: EndpointKey([100; 32]),
            now_ms: 1,
        })
        .unwrap();
    state.drain_changes();
    state
}
