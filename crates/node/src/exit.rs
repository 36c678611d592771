//! Exit codes, documented in README.md. Every failure reaches the user as one line and
//! one of these codes.

use std::fmt;

use blixard_net::api::ApiError;
use blixard_net::client::ClientError;

pub const OK: u8 = 0;
/// Anything not covered below.
pub const ERROR: u8 = 1;
/// Bad command line.
pub const USAGE: u8 = 2;
/// The node could not be reached.
pub const UNREACHABLE: u8 = 3;
/// The caller is not allowed, or its credential could not be read.
pub const UNAUTHORIZED: u8 = 4;
/// The cluster refused the request (bad input, used token, a tenant still in use, …).
pub const REFUSED: u8 = 5;
/// The cluster cannot act now (no leader, the leader unreachable, the node stopping):
/// nothing was applied.
pub const UNAVAILABLE: u8 = 6;
/// The data dir cannot be used (locked, corrupt, another cluster's, removed node), or a
/// backup file is damaged or newer than this build.
pub const DATA_DIR: u8 = 7;
/// The configuration is invalid.
pub const CONFIG: u8 = 8;
/// What the request names does not exist (a metadata key, a VM, a user, an image, …).
pub const NOT_FOUND: u8 = 9;
/// No answer in time, or the leader changed: a write may or may not have been applied
/// (a retry of the same command is safe to make; it is applied at most once per request).
pub const OUTCOME_UNKNOWN: u8 = 10;

/// A failure with its exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl fmt::Display) -> Self {
        Self {
            code,
            message: message.to_string(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

pub fn api_code(e: &ApiError) -> u8 {
    match e {
        ApiError::Unauthorized { .. } => UNAUTHORIZED,
        ApiError::WrongCluster { .. }
        | ApiError::Version(_)
        | ApiError::BadRequest(_)
        | ApiError::Rejected(_) => REFUSED,
        ApiError::NoLeader | ApiError::Unavailable(_) => UNAVAILABLE,
        ApiError::Timeout(_) | ApiError::OutcomeUnknown(_) => OUTCOME_UNKNOWN,
        ApiError::NotFound(_) => NOT_FOUND,
        ApiError::Internal(_) => ERROR,
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Connect { .. } => UNREACHABLE,
            ClientError::Timeout { .. } | ClientError::Silent { .. } => OUTCOME_UNKNOWN,
            ClientError::Api(api) => api_code(api),
            ClientError::Protocol { .. } => ERROR,
        };
        Failure::new(code, e)
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::new(api_code(&e), e)
    }
}
