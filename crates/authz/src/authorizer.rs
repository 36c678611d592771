//! The [`Authorizer`]: a policy set validated against the schema, answering requests.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cedar_policy::{
    Authorizer as CedarAuthorizer, Decision, Entities, PolicySet, Request, Schema, ValidationMode,
    Validator,
};

use crate::actions::Actions;
use crate::entities::{EntityBuilder, Store};
use crate::error::AuthzError;
use crate::schema::{self, DEFAULT_POLICIES};
use crate::types::{RequestContext, Resource, Subject, Verdict};

/// A validated policy set with the schema, ready to answer requests.
///
/// Answering is on the path of every API request, so what can be is prepared once per
/// policy set: parsed names, the policies that can decide each action, principals seen
/// before. The entities and requests [`Authorizer::authorize`] builds come from the
/// daemon's own state, so they are not checked against the schema on every request: the
/// tests check every shape it can build instead. Per request, only whether the action
/// applies to the kinds of principal and resource is looked up (in a table taken from the
/// schema); a request it does not apply to, or an unknown action, takes the slow path,
/// which validates everything as Cedar would and refuses.
#[derive(Debug)]
pub struct Authorizer {
    schema: Schema,
    policies: PolicySet,
    text: String,
    cedar: CedarAuthorizer,
    entities: EntityBuilder,
    actions: Actions,
    counts: Arc<DecisionCounts>,
}

/// How many requests an authorizer (or the succession of authorizers a node builds as its
/// policies change) allowed, denied, or could not decide: the node's
/// `blixard_authz_decisions_total`.
#[derive(Debug, Default)]
pub struct DecisionCounts {
    allowed: AtomicU64,
    denied: AtomicU64,
    errors: AtomicU64,
}

impl DecisionCounts {
    /// Allowed, denied, and not decided (an error).
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.allowed.load(Ordering::Relaxed),
            self.denied.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

impl Authorizer {
    /// Parses and validates `text` against the schema (strict mode).
    pub fn new(text: &str) -> Result<Self, AuthzError> {
        let schema = schema::parse()?;
        let policies = PolicySet::from_str(text).map_err(|e| AuthzError::Parse(flatten(&e)))?;
        let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        if !result.validation_passed() {
            let errors: Vec<String> = result.validation_errors().map(|e| e.to_string()).collect();
            return Err(AuthzError::Invalid(errors.join("; ")));
        }
        let entities = EntityBuilder::new()?;
        let actions = Actions::new(&schema, &policies, &entities)?;
        Ok(Self {
            schema,
            policies,
            text: text.to_string(),
            cedar: CedarAuthorizer::new(),
            entities,
            actions,
            counts: Arc::default(),
        })
    }

    /// The default policies.
    pub fn with_defaults() -> Result<Self, AuthzError> {
        Self::new(DEFAULT_POLICIES)
    }

    /// The policies' text, as given to [`Authorizer::new`].
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Counts this authorizer's decisions in `counts` (shared with the authorizers built
    /// before it) rather than in its own.
    pub fn counting(mut self, counts: Arc<DecisionCounts>) -> Self {
        self.counts = counts;
        self
    }

    /// Would `subject` be allowed `action` on `resource`?
    pub fn authorize(
        &self,
        subject: &Subject,
        action: &str,
        resource: &Resource,
        context: &RequestContext,
    ) -> Result<Verdict, AuthzError> {
        let verdict = self.decide(subject, action, resource, context);
        let count = match &verdict {
            Ok(v) if v.allowed => &self.counts.allowed,
            Ok(_) => &self.counts.denied,
            Err(_) => &self.counts.errors,
        };
        count.fetch_add(1, Ordering::Relaxed);
        verdict
    }

    fn decide(
        &self,
        subject: &Subject,
        action: &str,
        resource: &Resource,
        context: &RequestContext,
    ) -> Result<Verdict, AuthzError> {
        let Some((info, slice)) = self.actions.get(action, subject, resource) else {
            return self.authorize_validated(subject, action, resource, context);
        };
        let parts = self.entities.parts(
            subject,
            resource,
            slice.reads_context.then_some(context),
            Store::Lean,
        )?;
        let request = Request::new(
            parts.principal,
            info.uid.clone(),
            parts.resource,
            parts.context,
            None,
        )
        .map_err(|e| AuthzError::Request(e.to_string()))?;
        let mut entities = parts.entities;
        if info.grouped {
            entities.push(info.entity.clone());
        }
        // Adding to an empty store computes the transitive closure as `from_entities` does,
        // with less bookkeeping for a hierarchy of one or two entities.
        let entities = Entities::empty()
            .add_entities(entities, None)
            .map_err(|e| AuthzError::Request(e.to_string()))?;
        Ok(verdict(&self.cedar.is_authorized(
            &request,
            &slice.policies,
            &entities,
        )))
    }

    /// [`Authorizer::authorize`] with the request and the entities validated against the
    /// schema, and all the policies: for actions the schema does not know or that do not
    /// apply to this principal or resource.
    fn authorize_validated(
        &self,
        subject: &Subject,
        action: &str,
        resource: &Resource,
        context: &RequestContext,
    ) -> Result<Verdict, AuthzError> {
        let parts = self
            .entities
            .parts(subject, resource, Some(context), Store::Full)?;
        let action = self.actions.uid(action);
        let request = match Request::new(
            parts.principal,
            action,
            parts.resource,
            parts.context,
            Some(&self.schema),
        ) {
            Ok(r) => r,
            // The schema says this action never applies to this principal or resource:
            // that is a denial, not a failure.
            Err(e) => {
                return Ok(Verdict {
                    allowed: false,
                    reasons: Vec::new(),
                    errors: vec![e.to_string()],
                })
            }
        };
        let entities = Entities::from_entities(parts.entities, Some(&self.schema))
            .map_err(|e| AuthzError::Request(e.to_string()))?;
        Ok(verdict(&self.cedar.is_authorized(
            &request,
            &self.policies,
            &entities,
        )))
    }
}

fn verdict(response: &cedar_policy::Response) -> Verdict {
    Verdict {
        allowed: response.decision() == Decision::Allow,
        reasons: response
            .diagnostics()
            .reason()
            .map(|p| p.to_string())
            .collect(),
        errors: response
            .diagnostics()
            .errors()
            .map(|e| e.to_string())
            .collect(),
    }
}

fn flatten(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests;
