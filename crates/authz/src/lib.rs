//! Cedar authorization for Blixard: the schema, the default policies, how principals and
//! resources become Cedar entities, and the authorizer the API's choke point calls.
//!
//! **Boundary:** knows nothing of the network or storage; callers describe the principal,
//! the action and the resource with the plain types [`Subject`], [`Resource`] and
//! [`RequestContext`].
//!
//! Modules, each one job: `types` (the vocabulary above and [`Verdict`]), `schema` (the
//! built-in schema and default policies), `actions` (the schema's actions and the
//! policies that can decide each), `entities` (Cedar entities from the vocabulary, and
//! the principal cache), `authorizer` (the [`Authorizer`]), `error`.

mod actions;
mod authorizer;
mod entities;
mod error;
mod schema;
mod types;

pub use actions::ACTIONS;
pub use authorizer::{Authorizer, DecisionCounts};
pub use error::AuthzError;
pub use schema::{DEFAULT_POLICIES, SCHEMA};
pub use types::{RequestContext, Resource, Subject, Verdict};
