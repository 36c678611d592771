//! The `blixard/api/1` protocol: one [`Request`] enum, one [`Response`] enum, and for each
//! request a type implementing [`Rpc`] that names its response type.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use blixard_core::{
    Allocated, Capacity, ClusterId, EndpointKey, Image, Member, NodeId, Quota, RequestId, Tenant,
    User, Vm, VmSpec,
};
use blixard_raft::NodeStatus;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The API version spoken inside `blixard/api/1` frames.
pub const API_VERSION: u16 = 2;

/// A request names its response type.
pub trait Rpc: Serialize + DeserializeOwned + Into<Request> {
    type Response: DeserializeOwned;
    fn from_response(response: Response) -> Option<Self::Response>;
}

macro_rules! rpcs {
    ($($variant:ident($req:ty) -> $resp:ty;)*) => {
        /// Every API request. Each variant's payload type names its response via [`Rpc`].
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub enum Request { $($variant($req),)* }

        /// Every API response, one variant per request kind.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub enum Response { $($variant($resp),)* }

        $(
            impl From<$req> for Request {
                fn from(r: $req) -> Request { Request::$variant(r) }
            }
            impl Rpc for $req {
                type Response = $resp;
                fn from_response(response: Response) -> Option<$resp> {
                    match response {
                        Response::$variant(r) => Some(r),
                        #[allow(unreachable_patterns)]
                        _ => None,
                    }
                }
            }
        )*

        impl Request {
            /// How many request kinds this build knows: new kinds are appended, so a
            /// caller's kind at or past this is one from a newer release.
            pub const KINDS: u32 = <[&str]>::len(&[$(stringify!($variant)),*]) as u32;

            /// The request kind, as authorization and logs name it.
            pub fn kind(&self) -> &'static str {
                match self { $(Request::$variant(_) => stringify!($variant),)* }
            }
        }
    };
}

rpcs! {
    Status(StatusRequest) -> ClusterStatus;
    TokenCreate(TokenCreate) -> TokenCreated;
    Join(JoinCluster) -> Joined;
    Leave(LeaveCluster) -> Left;
    MetaSet(MetaSet) -> MetaSetDone;
    MetaGet(MetaGet) -> MetaEntries;
    UserAdd(UserAdd) -> UserAdded;
    UserRemove(UserRemove) -> UserRemoved;
    UserList(UserList) -> UserEntries;
    PolicyGet(PolicyGet) -> PolicyText;
    PolicySet(PolicySet) -> PolicySetDone;
    PolicyTest(PolicyTest) -> PolicyVerdict;
    ImageImport(ImageImport) -> ImageInfo;
    ImageList(ImageList) -> ImageEntries;
    ImageShow(ImageShow) -> ImageDetail;
    ImagePull(ImagePull) -> ImagePulled;
    ImagePin(ImagePin) -> ImageInfo;
    ImageRemove(ImageRemove) -> ImageRemoved;
    CacheKey(CacheKeyGet) -> CacheKeyInfo;
    TenantCreate(TenantCreate) -> TenantInfo;
    TenantList(TenantList) -> TenantEntries;
    QuotaSet(QuotaSet) -> TenantInfo;
    QuotaShow(QuotaShow) -> TenantInfo;
    NodeList(NodeList) -> NodeEntries;
    UserSetKey(UserSetKey) -> UserKeySet;
    AdminSetKey(AdminSetKey) -> AdminKeySet;
    VmCreate(VmCreate) -> VmInfo;
    VmList(VmList) -> VmEntries;
    VmShow(VmShow) -> VmInfo;
    VmControl(VmControl) -> VmInfo;
    VmDelete(VmDelete) -> VmDeleted;
    VmLogs(VmLogs) -> VmConsole;
    NodeDrain(NodeDrain) -> NodeDrained;
    NodeStats(NodeStatsRequest) -> Box<NodeStats>;
    ClusterBackup(BackupRequest) -> BackupData;
    TenantRemove(TenantRemove) -> TenantRemoved;
    TokenList(TokenListRequest) -> TokenEntries;
    TokenRevoke(TokenRevoke) -> TokenRevoked;
    Events(EventsRequest) -> EventList;
    LearnerTokenCreate(LearnerTokenCreate) -> TokenCreated;
    RoleSet(RoleSet) -> RoleSetDone;
}

/// The state changes the answering node applied after `after` (the latest ones without
/// it), of `topics` (all when empty); when there are none yet, the node waits up to
/// `wait_ms` (25 s at most) for one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsRequest {
    pub after: Option<u64>,
    pub topics: Vec<blixard_core::Topic>,
    pub wait_ms: u64,
}

/// One applied state change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Its raft index: events are in index order, and the same on every member.
    pub index: u64,
    /// When the answering node applied it.
    pub at_ms: u64,
    /// The command (`create_vm`, `report_vm`, `set_node_down`, …).
    pub kind: String,
    pub topic: blixard_core::Topic,
    /// What it changed: `tenant/name` of a VM, `nN` of a member, an image's name, …
    pub name: String,
    pub what: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventList {
    pub events: Vec<Event>,
    /// The index to ask after next.
    pub next: u64,
    /// Events after the index asked for are no longer held: the first one held is this.
    pub gap: Option<u64>,
}

/// The progress phase an image pull reports once its node is recorded as a holder (every
/// blob here), before it unpacks.
pub const PHASE_HELD: &str = "held";

/// How long a long-running request (an image import or pull) may take.
pub const LONG_REQUEST: std::time::Duration = std::time::Duration::from_secs(3600);

impl Request {
    /// Requests that move whole images (or the whole state) and may take minutes, and
    /// the event stream's long poll; they get [`LONG_REQUEST`].
    pub fn is_long_running(&self) -> bool {
        matches!(
            self,
            Request::ImageImport(_)
                | Request::ImagePull(_)
                | Request::ClusterBackup(_)
                | Request::Events(_)
        )
    }
}

/// What goes on the wire for a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestFrame {
    pub version: u16,
    /// The cluster the caller means to talk to; a node of another cluster refuses.
    pub cluster: Option<ClusterId>,
    /// Set when a node forwards a request to the leader; a forwarded request is never
    /// forwarded again.
    pub forwarded: bool,
    /// The caller's id for a write: a retry carries the same id, and the cluster applies
    /// the write's commands once (`Command::Once`). The client sets it on every mutating
    /// request; a node forwarding a request passes it on.
    pub id: Option<RequestId>,
    pub request: Request,
    /// The caller's span as a W3C `traceparent`, so the request's spans join its trace.
    /// Last and optional on the wire: a frame from a caller that predates it (ending after
    /// `request`) reads as `None`, and a node that predates it ignores the trailing bytes.
    #[serde(default, deserialize_with = "trailing_trace")]
    pub trace: Option<String>,
}

impl RequestFrame {
    /// A frame for `request`, carrying the current span's trace context (if any).
    pub fn new(cluster: Option<ClusterId>, request: Request) -> Self {
        Self {
            version: API_VERSION,
            cluster,
            forwarded: false,
            id: None,
            request,
            trace: crate::trace::current(),
        }
    }
}

/// Why a request frame that does not decode was refused, when its prefix says it: a
/// request kind this build does not know (a newer caller's), or another API version.
pub fn undecodable_frame(body: &[u8]) -> Option<ApiError> {
    #[derive(Deserialize)]
    struct Prefix {
        version: u16,
        _cluster: Option<ClusterId>,
        _forwarded: bool,
        _id: Option<RequestId>,
        /// The `request` enum's variant index.
        kind: u32,
    }
    let prefix: Prefix = postcard::from_bytes(body).ok()?;
    if prefix.version != API_VERSION {
        return Some(ApiError::Version(prefix.version));
    }
    (prefix.kind >= Request::KINDS).then(|| {
        ApiError::BadRequest(format!(
            "this node runs blixard {} and does not know request kind {} (it knows {}): the caller is newer; upgrade this node, or send the request to an upgraded member",
            env!("CARGO_PKG_VERSION"),
            prefix.kind,
            Request::KINDS
        ))
    })
}

/// Reads the optional last field of a frame: absent (the frame ended) or unreadable, it is
/// `None`; the trace context is advice, never a reason to refuse a request.
fn trailing_trace<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)
        .ok()
        .flatten()
        .filter(|t| t.len() <= crate::trace::MAX_TRACEPARENT))
}

/// The answer to a request.
pub type ResponseFrame = Result<Response, ApiError>;

/// What the server writes on a request's stream: for long-running requests, progress
/// updates first; then, always, the answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ResponseItem {
    Progress(ProgressUpdate),
    Done(ResponseFrame),
}

/// How far a long-running request (an image import or pull) has come.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressUpdate {
    /// What is happening ("importing", "fetching").
    pub phase: String,
    pub done: u64,
    pub total: u64,
}

/// Where a handler reports progress; updates are dropped when nobody listens or the
/// listener is behind, and sent at most a few times a second.
#[derive(Clone, Debug, Default)]
pub struct ProgressSink {
    tx: Option<tokio::sync::mpsc::Sender<ProgressUpdate>>,
    last: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl ProgressSink {
    /// Reports to nobody.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn new(tx: tokio::sync::mpsc::Sender<ProgressUpdate>) -> Self {
        Self {
            tx: Some(tx),
            last: Default::default(),
        }
    }

    pub fn report(&self, phase: &str, done: u64, total: u64) {
        let Some(tx) = &self.tx else { return };
        let now = std::time::Instant::now();
        if let Ok(mut last) = self.last.lock() {
            let due = last.is_none_or(|t| now.duration_since(t).as_millis() >= 200);
            if !due && done < total {
                return;
            }
            *last = Some(now);
        }
        let _ = tx.try_send(ProgressUpdate {
            phase: phase.to_string(),
            done,
            total,
        });
    }
}

/// Errors a node returns to a caller. Each is one line for the user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApiError {
    #[error("not authorized: {caller} may not {action}")]
    Unauthorized { caller: String, action: String },
    #[error("this node belongs to cluster {actual}, not {expected}")]
    WrongCluster { expected: String, actual: String },
    #[error("unsupported API version {0} (this node speaks {API_VERSION})")]
    Version(u16),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("refused: {0}")]
    Rejected(String),
    #[error("no leader is reachable; the cluster may be electing one or may have lost its quorum")]
    NoLeader,
    #[error("timed out after {0} ms waiting for the cluster")]
    Timeout(u64),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
    // Appended (older callers do not know them; see docs/operations.md, "Upgrades").
    /// What the request names does not exist (`meta get` of an absent key, a VM, a user…).
    #[error("not found: {0}")]
    NotFound(String),
    /// A write may or may not have been applied: it was handed to a leader, and no answer
    /// came within the timeout, or the leader changed before it was applied.
    #[error("outcome unknown: {0}; it may or may not have been applied")]
    OutcomeUnknown(String),
}

impl ApiError {
    /// A short, fixed name for the error's kind (a metric label, a log field).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized { .. } => "unauthorized",
            ApiError::WrongCluster { .. } => "wrong_cluster",
            ApiError::Version(_) => "version",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Rejected(_) => "rejected",
            ApiError::NoLeader => "no_leader",
            ApiError::Timeout(_) => "timeout",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
            ApiError::NotFound(_) => "not_found",
            ApiError::OutcomeUnknown(_) => "outcome_unknown",
        }
    }
}

/// Cluster status, as seen by the answering node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRequest {
    /// Serve from local state without a ReadIndex round (may be behind).
    pub stale: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster_id: ClusterId,
    pub name: String,
    /// The node that answered.
    pub node: NodeId,
    pub raft: Box<NodeStatus>,
    pub members: Vec<Member>,
    pub stale: bool,
    /// The cluster version and what each member runs, as the answering node knows it (a
    /// leader knows every member that talks to it). Last and optional on the wire: an
    /// older node's answer reads as `None`, and an older caller ignores it.
    #[serde(default, deserialize_with = "trailing_versions")]
    pub versions: Option<Versions>,
}

/// The versions in a [`ClusterStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versions {
    /// The cluster version: commands newer than it are refused.
    pub cluster: u32,
    /// The answering node's log version and release.
    pub log: u32,
    pub release: String,
    /// Per other member: what its latest raft hello to the answering node said (`None`
    /// when it has not opened one since the node started; a `log` of 1 and no release
    /// for a release before the cluster version).
    pub members: Vec<(NodeId, Option<MemberVersion>)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberVersion {
    pub log: u32,
    pub release: Option<String>,
}

fn trailing_versions<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Versions>, D::Error> {
    Ok(Option::<Versions>::deserialize(d).ok().flatten())
}

/// Creates a one-time join token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreate {
    pub ttl_secs: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    pub ticket: String,
    pub expires_at_ms: u64,
}

/// Creates a one-time join token whose node joins as a learner and stays one
/// (`cluster token create --learner`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnerTokenCreate {
    pub ttl_secs: u64,
}

/// `cluster promote` / `cluster demote`: makes a member a voter, or a learner that stays
/// one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleSet {
    pub node: NodeId,
    pub role: blixard_core::MemberRole,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleSetDone {
    pub node: NodeId,
    pub role: blixard_core::MemberRole,
}

/// Lists the join tokens (never their secrets: a token is known by the hash of its
/// secret, `id`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenListRequest {
    pub stale: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenEntries {
    pub tokens: Vec<TokenEntry>,
}

/// One join token: the hex hash of its secret, when it was made and expires, and the
/// node that used it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenEntry {
    pub id: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub used_by: Option<NodeId>,
}

/// Revokes an unused join token, named by its id or a unique prefix of it (at least 8
/// hex digits).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRevoke {
    pub id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRevoked {
    pub id: String,
}

/// Sent by a new node with the secret from its ticket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinCluster {
    pub secret: [u8; 32],
    /// The joining node's endpoint id; must be the caller's own key (checked by the first
    /// node that receives the request, which may forward it to the leader).
    pub endpoint: EndpointKey,
    pub name: String,
    pub addrs: Vec<SocketAddr>,
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    /// The admin credential the new node writes into its data dir.
    pub admin: EndpointKey,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    pub node: NodeId,
    pub cluster_id: ClusterId,
    /// Every member, so the new node can reach its peers before it has the state.
    pub members: Vec<(NodeId, EndpointKey, Vec<SocketAddr>)>,
}

/// Removes a member from the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaveCluster {
    pub node: NodeId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Left {
    pub node: NodeId,
}

/// Sets (or, with `None`, deletes) a cluster metadata key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaSet {
    pub key: String,
    pub value: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaSetDone {}

/// Reads one metadata key, or all of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaGet {
    pub key: Option<String>,
    pub stale: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaEntries {
    pub entries: Vec<(String, String)>,
}

/// Adds a user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserAdd {
    pub name: String,
    pub key: EndpointKey,
    pub roles: Vec<String>,
    pub tenant: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserAdded {}

/// Removes a user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRemove {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRemoved {}

/// Lists the users the caller may see.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserList {
    pub stale: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserEntries {
    pub users: Vec<User>,
}

/// Shows the policies in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyGet {}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyText {
    pub text: String,
    /// The built-in defaults are in force (no `policy set` yet).
    pub default: bool,
}

/// Replaces the policies; refused unless they validate against the schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySet {
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySetDone {}

/// Asks whether a principal would be allowed an action on a resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyTest {
    /// `user:NAME`, `node:ID` or `key:HEX`.
    pub principal: String,
    pub action: String,
    /// `cluster` or `user:NAME`.
    pub resource: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVerdict {
    pub principal: String,
    pub allowed: bool,
    /// The policies that decided it.
    pub reasons: Vec<String>,
    pub errors: Vec<String>,
}

/// Imports a closure found on the answering node's host: a store path (with everything it
/// references, enumerated by Nix) or a plain directory (wrapped as one store path).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageImport {
    pub name: String,
    /// A path on the answering node's host.
    pub path: String,
    /// The owning tenant; defaults to the caller's tenant, none for shared images.
    pub tenant: Option<String>,
    pub pin: bool,
}

/// An image as `image list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub image: Image,
}

/// Lists the images the caller may see.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageList {
    pub stale: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageEntries {
    pub images: Vec<Image>,
}

/// One image with the store paths of its closure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageShow {
    pub name: String,
    pub stale: bool,
}

/// One store path of an image's closure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePath {
    pub path: String,
    /// Nix's form, `sha256:<nix-base32>`.
    pub nar_hash: String,
    pub nar_size: u64,
    pub references: Vec<String>,
    /// The NAR's blob (BLAKE3, hex).
    pub blob: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageDetail {
    pub image: Image,
    pub paths: Vec<ImagePath>,
}

/// Makes a node fetch an image now (and materialise it in its store).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePull {
    pub name: String,
    /// The node that should fetch it; the answering node when `None`.
    pub node: Option<NodeId>,
}

/// What one holder contributed to a fetch, or why it was dropped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderReport {
    pub node: NodeId,
    pub blobs: u32,
    pub bytes: u64,
    /// Why this holder was dropped from the fetch (corrupt data, gone mid-transfer, …).
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePulled {
    pub node: NodeId,
    /// Blobs and bytes fetched from other nodes (zero when the node already held it).
    pub fetched_blobs: u32,
    pub fetched_bytes: u64,
    pub holders: Vec<HolderReport>,
    /// Store paths unpacked into the node's store (those already there are skipped).
    pub materialised: Vec<String>,
    /// Time spent fetching, and in total (fetch, unpack, recording the holder).
    pub fetch_millis: u64,
    pub millis: u64,
}

/// Pins or unpins an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePin {
    pub name: String,
    pub pinned: bool,
}

/// Removes an image; refused while it is pinned or used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRemove {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRemoved {}

/// The binary cache's public key and the answering node's cache URL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKeyGet {}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKeyInfo {
    /// `name:base64`, for Nix's `trusted-public-keys`; `None` before the first import.
    pub public_key: Option<String>,
    /// `http://ADDR` of the answering node's binary cache, when it serves one.
    pub url: Option<String>,
}

/// Creates a tenant (no quota limits until `quota set`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantCreate {
    pub name: String,
}

/// Removes a tenant that owns no VMs or images and has no users.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRemove {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRemoved {}

/// A tenant, its quota and what its VMs use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantInfo {
    pub tenant: Tenant,
    pub used: Allocated,
}

/// Lists the tenants the caller may see.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantList {
    pub stale: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantEntries {
    pub tenants: Vec<TenantInfo>,
}

/// Replaces a tenant's quota (`None` fields are unlimited).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaSet {
    pub tenant: String,
    pub quota: Quota,
}

/// One tenant's quota and usage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaShow {
    pub tenant: String,
    pub stale: bool,
}

/// A backup of the whole cluster state (`blixard cluster backup`), taken by the answering
/// node at its applied index after a read barrier (so it holds every write acknowledged
/// before the request).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRequest {}

/// The backup file's bytes (`blixard_core::backup`), checksum included. The one answer
/// allowed over [`crate::frame::MAX_FRAME`] (up to [`crate::frame::MAX_BACKUP_FRAME`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupData {
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for BackupData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackupData({} bytes)", self.bytes.len())
    }
}

/// The answering node's key figures (`blixard node stats`): the same sources as its
/// `/metrics`, without Prometheus.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatsRequest {}

/// One peer's raft connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLink {
    pub node: NodeId,
    /// `direct` or `relay`.
    pub path: String,
    pub rtt_micros: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    pub node: NodeId,
    pub role: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub leader_changes_seen: u64,
    pub proposals_committed: u64,
    pub proposals_failed: u64,
    pub proposals_pending: u64,
    pub state_check_alarm: bool,
    /// Members by `role/status` (e.g. `voter/active`), as this node's state knows them.
    pub members: BTreeMap<String, u64>,
    pub capacity: Capacity,
    pub allocated: Allocated,
    /// VMs placed here (and, on the leader, placed nowhere) by phase.
    pub vms: BTreeMap<String, u64>,
    pub vm_starts_ok: u64,
    pub vm_starts_failed: u64,
    pub images_held: u64,
    pub image_store_bytes: u64,
    pub cache_sent_bytes: u64,
    pub api_requests_ok: u64,
    pub api_requests_failed: u64,
    pub authz_allowed: u64,
    pub authz_denied: u64,
    pub audit_records_dropped: u64,
    pub peers: Vec<PeerLink>,
    pub resident_memory_bytes: u64,
    /// Milliseconds of CPU time (user and system).
    pub cpu_millis: u64,
    pub open_fds: u64,
    pub uptime_secs: u64,
    pub data_dir_available_bytes: Option<u64>,
}

/// Lists the hosts with what they offer and what is placed on them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeList {
    pub stale: bool,
}

/// A host as `node list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub member: Member,
    pub allocated: Allocated,
    pub drained: bool,
    pub leader: bool,
    /// Since when the leader has the host marked down, if it does.
    pub down_since_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntries {
    pub nodes: Vec<NodeEntry>,
}

/// Replaces a user's key in place (rotation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSetKey {
    pub name: String,
    pub key: EndpointKey,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserKeySet {}

/// Replaces a node's admin credential (rotation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminSetKey {
    pub node: NodeId,
    pub key: EndpointKey,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminKeySet {}

/// Which VM a request means: `tenant` defaults to the caller's tenant, else `default`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRef {
    pub name: String,
    pub tenant: Option<String>,
}

/// Creates a VM (`spec.tenant` empty = the caller's tenant, else `default`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCreate {
    pub spec: Box<VmSpec>,
    /// Start it once placed (`--no-start` clears this).
    pub start: bool,
}

/// A VM as the cluster knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub vm: Box<Vm>,
}

/// Lists the VMs the caller may see, optionally of one tenant or on one host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmList {
    pub tenant: Option<String>,
    pub node: Option<NodeId>,
    pub stale: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEntries {
    pub vms: Vec<Vm>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmShow {
    pub vm: VmRef,
    pub stale: bool,
}

/// What `vm start|stop|restart` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmOp {
    Start,
    Stop,
    Restart,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmControl {
    pub vm: VmRef,
    pub op: VmOp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDelete {
    pub vm: VmRef,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDeleted {}

/// The guest's console, read on the VM's host (any node forwards the request there).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmLogs {
    pub vm: VmRef,
    /// Without `from`: the last this many lines.
    pub lines: u32,
    /// Continue from this byte offset of the console log (what the last answer's `next`
    /// said), for `--follow`.
    pub from: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConsole {
    pub node: NodeId,
    pub text: String,
    /// The offset to ask from next time.
    pub next: u64,
}

/// Drains a host (its VMs move elsewhere, it takes no new ones) or undrains it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDrain {
    pub node: NodeId,
    pub drained: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDrained {
    /// The VMs that were on the host and are now being placed elsewhere.
    pub moved: Vec<String>,
}
