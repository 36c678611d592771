//! The built-in Cedar schema and the policies a new cluster starts with.

use std::str::FromStr;

use cedar_policy::{EntityTypeName, Schema};

use crate::error::AuthzError;

/// The Cedar schema, in Cedar's schema syntax.
pub const SCHEMA: &str = include_str!("../policies/schema.cedarschema");
/// The policies a new cluster starts with.
pub const DEFAULT_POLICIES: &str = include_str!("../policies/default.cedar");

/// The schema, parsed.
pub(crate) fn parse() -> Result<Schema, AuthzError> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(s, _warnings)| s)
        .map_err(|e| AuthzError::Schema(e.to_string()))
}

/// The type `Blixard::{name}` of the schema.
pub(crate) fn type_name(name: &str) -> Result<EntityTypeName, AuthzError> {
    EntityTypeName::from_str(&format!("Blixard::{name}"))
        .map_err(|e| AuthzError::Schema(e.to_string()))
}
