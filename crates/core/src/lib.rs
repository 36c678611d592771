//! Blixard's domain types and the deterministic cluster state machine.
//!
//! Everything that changes cluster state is one [`Command`]. [`State::apply`] is a pure
//! function of the current state and the command: it reads no clock, draws no random
//! numbers and does no IO. Times and ids arrive inside the command. That is what lets every
//! node apply the same log to the same result, and what makes simulation testing possible.
//!
//! The modules are layered, each using only those before it: `ids`, `encoding`, `table`;
//! the domain types (`member`, `user`, `image`, `vm`); the `scheduler`; `command`; and
//! `state`, which applies commands.
//!
//! **Invariant:** this crate depends on no async runtime, no network and no storage crate.

pub mod backup;
mod command;
mod encoding;
mod ids;
mod image;
mod member;
mod scheduler;
mod state;
mod table;
mod user;
mod vm;

pub use command::{
    Command, CommandOutput, Envelope, JoinRequest, NewMember, StateDigest, Subject, Topic,
    LOG_VERSION,
};
pub use encoding::{decode_versioned, encode_versioned, DecodeError, FORMAT_VERSION};
pub use ids::{valid_name, BlobHash, ClusterId, EndpointKey, NodeId, ParseIdError, RequestId};
pub use image::{Image, MAX_IMAGE_BYTES, MAX_IMAGE_NARS};
pub use member::{
    AdminCredential, Capacity, ClusterMeta, JoinToken, Member, MemberRole, MemberStatus,
};
pub use scheduler::{
    fits, place, FitError, Ledger, PlaceError, Placement, SchedulerConfig, Strategy,
};
pub use state::{ApplyError, LoadError, Restore, State};
pub use table::{Row, Table};
pub use user::User;
pub use vm::{
    valid_vm_name, Allocated, Desired, Phase, Quota, QuotaError, RestartPolicy, Tenant, Transition,
    Vm, VmSpec, DEFAULT_TENANT, HISTORY, MAX_MEMORY_MIB, MAX_VCPUS, MAX_VM_NAME, MIN_MEMORY_MIB,
    NODE_CONSTRAINT, SPREAD_GROUPS_SINCE, SPREAD_SEPARATOR, VM_NAME_RULE,
};
