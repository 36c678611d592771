//! The crate's error: why a policy set or a request could not be used.

/// Why a policy set was refused or a request could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("the built-in schema is invalid: {0}")]
    Schema(String),
    #[error("policies do not parse: {0}")]
    Parse(String),
    #[error("policies do not match the schema: {0}")]
    Invalid(String),
    #[error("cannot build the request: {0}")]
    Request(String),
}
