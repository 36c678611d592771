//! The vocabulary callers speak: who is asking, about what, in which context, and the verdict.

/// Who is asking, as Cedar will see it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Subject {
    User {
        name: String,
        roles: Vec<String>,
        tenant: Option<String>,
    },
    Node {
        id: u64,
    },
    /// A host acting for itself, in process: its own configuration (declared VMs) and its
    /// machinery (the scheduler, the host agent, the image janitor).
    Host {
        id: u64,
    },
    /// An authenticated key unknown to the cluster (hex).
    Anonymous {
        key: String,
    },
}

/// What is being acted on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource {
    Cluster,
    User {
        name: String,
        roles: Vec<String>,
        tenant: Option<String>,
    },
    /// An image; `tenant` is `None` for images shared by the whole cluster.
    Image {
        name: String,
        tenant: Option<String>,
    },
    Tenant {
        name: String,
    },
    /// A VM, named `tenant/name`, with its labels as `key=value` strings.
    Vm {
        name: String,
        tenant: String,
        labels: Vec<String>,
    },
    /// A host, with its labels as `key=value` strings.
    Node {
        id: u64,
        labels: Vec<String>,
    },
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::Cluster => write!(f, "the cluster"),
            Resource::User { name, .. } => write!(f, "user {name}"),
            Resource::Image { name, .. } => write!(f, "image {name}"),
            Resource::Tenant { name } => write!(f, "tenant {name}"),
            Resource::Vm { name, tenant, .. } => write!(f, "VM {tenant}/{name}"),
            Resource::Node { id, .. } => write!(f, "node n{id}"),
        }
    }
}

/// The request's context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestContext {
    pub time_ms: u64,
    pub source: String,
}

impl RequestContext {
    /// A request arriving now from `source` (the caller's key, hex).
    pub fn now(source: impl Into<String>) -> Self {
        Self {
            time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            source: source.into(),
        }
    }
}

/// The outcome, with the ids of the policies that decided it (or the evaluation errors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub reasons: Vec<String>,
    pub errors: Vec<String>,
}
