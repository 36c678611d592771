//! Users as state knows them: named keys with roles.

use serde::{Deserialize, Serialize};

use crate::ids::EndpointKey;

/// A user: a named key with roles and an optional tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub key: EndpointKey,
    pub roles: Vec<String>,
    pub tenant: Option<String>,
    pub created_at_ms: u64,
}
