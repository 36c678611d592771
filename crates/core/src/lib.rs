//! Blixard's domain types and the deterministic cluster state machine.
//!
//! Everything that changes cluster state is one [`Command`]. [`State::apply`] is a pure
//! function of the current state and the command: it reads no clock, draws no random
//! numbers and does no IO. Times and ids arrive inside the command. That is what lets every
//! node apply the same log to the same result, and what makes simulation testing possible.
//!
//! **Invariant:** this crate depends on no async runtime, no network and no storage crate.

mod command;
mod encoding;
mod ids;
mod image;
mod state;
mod table;
mod vm;

pub use command::{Command, CommandOutput, Envelope, JoinRequest, MemberRole, NewMember};
pub use encoding::{decode_versioned, encode_versioned, DecodeError, FORMAT_VERSION};
pub use ids::{BlobHash, ClusterId, EndpointKey, NodeId, ParseIdError};
pub use image::{Image, MAX_IMAGE_BYTES, MAX_IMAGE_NARS};
pub use state::{
    valid_name, AdminCredential, ApplyError, Capacity, ClusterMeta, JoinToken, LoadError, Member,
    MemberStatus, State, User,
};
pub use table::{Row, Table};
pub use vm::{
    fits, place, valid_vm_name, Allocated, Desired, Ledger, Phase, Placement, Quota, RestartPolicy,
    SchedulerConfig, Strategy, Tenant, Transition, Vm, VmSpec, DEFAULT_TENANT, HISTORY,
    MAX_MEMORY_MIB, MAX_VCPUS, MAX_VM_NAME, MIN_MEMORY_MIB, NODE_CONSTRAINT, VM_NAME_RULE,
};
