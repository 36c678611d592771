//! Cedar authorization for Blixard: the schema, the default policies, how principals and
//! resources become Cedar entities, and the authorizer the API's choke point calls.
//!
//! **Boundary:** knows nothing of the network or storage; callers describe the principal,
//! the action and the resource with the plain types below.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use cedar_policy::{
    Authorizer as CedarAuthorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};

/// The Cedar schema, in Cedar's schema syntax.
pub const SCHEMA: &str = include_str!("../policies/schema.cedarschema");
/// The policies a new cluster starts with.
pub const DEFAULT_POLICIES: &str = include_str!("../policies/default.cedar");

/// Every action in the schema, for tests and `policy test`.
pub const ACTIONS: &[&str] = &[
    "cluster:read",
    "cluster:manage",
    "cluster:join",
    "node:forward",
    "user:manage",
    "user:read",
    "policy:set",
    "policy:read",
    "image:read",
    "image:manage",
    "blob:fetch",
    "tenant:read",
    "tenant:manage",
    "vm:read",
    "vm:manage",
    "node:manage",
];

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

/// Who is asking, as Cedar will see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    User {
        name: String,
        roles: Vec<String>,
        tenant: Option<String>,
    },
    Node {
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

/// A validated policy set with the schema, ready to answer requests.
#[derive(Debug)]
pub struct Authorizer {
    schema: Schema,
    policies: PolicySet,
    text: String,
    cedar: CedarAuthorizer,
}

fn schema() -> Result<Schema, AuthzError> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(s, _warnings)| s)
        .map_err(|e| AuthzError::Schema(e.to_string()))
}

fn type_name(name: &str) -> Result<EntityTypeName, AuthzError> {
    EntityTypeName::from_str(&format!("Blixard::{name}"))
        .map_err(|e| AuthzError::Request(e.to_string()))
}

fn uid(ty: &str, id: &str) -> Result<EntityUid, AuthzError> {
    Ok(EntityUid::from_type_name_and_id(
        type_name(ty)?,
        EntityId::new(id),
    ))
}

fn user_entity(name: &str, roles: &[String], tenant: Option<&str>) -> Result<Entity, AuthzError> {
    let attrs = HashMap::from([
        (
            "roles".to_string(),
            RestrictedExpression::new_set(
                roles
                    .iter()
                    .map(|r| RestrictedExpression::new_string(r.clone())),
            ),
        ),
        (
            "tenant".to_string(),
            RestrictedExpression::new_string(tenant.unwrap_or_default().to_string()),
        ),
    ]);
    Entity::new(uid("User", name)?, attrs, HashSet::new())
        .map_err(|e| AuthzError::Request(e.to_string()))
}

fn string_set(items: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(
        items
            .iter()
            .map(|i| RestrictedExpression::new_string(i.clone())),
    )
}

/// An entity of type `ty` with only a `tenant` attribute (images).
fn tenant_owned(
    ty: &str,
    id: &str,
    tenant: &str,
    entities: &mut Vec<Entity>,
) -> Result<EntityUid, AuthzError> {
    let u = uid(ty, id)?;
    let attrs = HashMap::from([(
        "tenant".to_string(),
        RestrictedExpression::new_string(tenant.to_string()),
    )]);
    entities.push(
        Entity::new(u.clone(), attrs, HashSet::new())
            .map_err(|e| AuthzError::Request(e.to_string()))?,
    );
    Ok(u)
}

impl Authorizer {
    /// Parses and validates `text` against the schema (strict mode).
    pub fn new(text: &str) -> Result<Self, AuthzError> {
        let schema = schema()?;
        let policies = PolicySet::from_str(text).map_err(|e| AuthzError::Parse(flatten(&e)))?;
        let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        if !result.validation_passed() {
            let errors: Vec<String> = result.validation_errors().map(|e| e.to_string()).collect();
            return Err(AuthzError::Invalid(errors.join("; ")));
        }
        Ok(Self {
            schema,
            policies,
            text: text.to_string(),
            cedar: CedarAuthorizer::new(),
        })
    }

    /// The default policies.
    pub fn with_defaults() -> Result<Self, AuthzError> {
        Self::new(DEFAULT_POLICIES)
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Would `subject` be allowed `action` on `resource`?
    pub fn authorize(
        &self,
        subject: &Subject,
        action: &str,
        resource: &Resource,
        context: &RequestContext,
    ) -> Result<Verdict, AuthzError> {
        let mut entities = Vec::new();
        let principal = match subject {
            Subject::User {
                name,
                roles,
                tenant,
            } => {
                entities.push(user_entity(name, roles, tenant.as_deref())?);
                uid("User", name)?
            }
            Subject::Node { id } => {
                let attrs = HashMap::from([(
                    "node_id".to_string(),
                    RestrictedExpression::new_long(i64::try_from(*id).unwrap_or(i64::MAX)),
                )]);
                let u = uid("Node", &format!("n{id}"))?;
                entities.push(
                    Entity::new(u.clone(), attrs, HashSet::new())
                        .map_err(|e| AuthzError::Request(e.to_string()))?,
                );
                u
            }
            Subject::Anonymous { key } => {
                let u = uid("Anonymous", key)?;
                entities.push(Entity::new_no_attrs(u.clone(), HashSet::new()));
                u
            }
        };
        let resource_uid = match resource {
            Resource::Cluster => {
                let u = uid("Cluster", "cluster")?;
                entities.push(Entity::new_no_attrs(u.clone(), HashSet::new()));
                u
            }
            Resource::User {
                name,
                roles,
                tenant,
            } => {
                let u = uid("User", name)?;
                if !entities.iter().any(|e| e.uid() == u) {
                    entities.push(user_entity(name, roles, tenant.as_deref())?);
                }
                u
            }
            Resource::Tenant { name } => {
                let u = uid("Tenant", name)?;
                let attrs = HashMap::from([(
                    "name".to_string(),
                    RestrictedExpression::new_string(name.clone()),
                )]);
                entities.push(
                    Entity::new(u.clone(), attrs, HashSet::new())
                        .map_err(|e| AuthzError::Request(e.to_string()))?,
                );
                u
            }
            Resource::Image { name, tenant } => tenant_owned(
                "Image",
                name,
                tenant.as_deref().unwrap_or_default(),
                &mut entities,
            )?,
            Resource::Vm {
                name,
                tenant,
                labels,
            } => {
                let u = uid("Vm", &format!("{tenant}/{name}"))?;
                let attrs = HashMap::from([
                    (
                        "tenant".to_string(),
                        RestrictedExpression::new_string(tenant.clone()),
                    ),
                    ("labels".to_string(), string_set(labels)),
                ]);
                entities.push(
                    Entity::new(u.clone(), attrs, HashSet::new())
                        .map_err(|e| AuthzError::Request(e.to_string()))?,
                );
                u
            }
            Resource::Node { id, labels } => {
                let u = uid("Node", &format!("n{id}"))?;
                let attrs = HashMap::from([
                    (
                        "node_id".to_string(),
                        RestrictedExpression::new_long(i64::try_from(*id).unwrap_or(i64::MAX)),
                    ),
                    ("labels".to_string(), string_set(labels)),
                ]);
                // A node acting on itself: one entity, with the labels.
                entities.retain(|e| e.uid() != u);
                entities.push(
                    Entity::new(u.clone(), attrs, HashSet::new())
                        .map_err(|e| AuthzError::Request(e.to_string()))?,
                );
                u
            }
        };
        let action_uid = uid("Action", action)?;
        let ctx = Context::from_pairs([
            (
                "time".to_string(),
                RestrictedExpression::new_long(i64::try_from(context.time_ms).unwrap_or(i64::MAX)),
            ),
            (
                "source".to_string(),
                RestrictedExpression::new_string(context.source.clone()),
            ),
        ])
        .map_err(|e| AuthzError::Request(e.to_string()))?;
        let request =
            match Request::new(principal, action_uid, resource_uid, ctx, Some(&self.schema)) {
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
        let entities = Entities::from_entities(entities, Some(&self.schema))
            .map_err(|e| AuthzError::Request(e.to_string()))?;
        let response = self
            .cedar
            .is_authorized(&request, &self.policies, &entities);
        Ok(Verdict {
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
        })
    }
}

fn flatten(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> RequestContext {
        RequestContext {
            time_ms: 1,
            source: "ab".into(),
        }
    }

    fn user(roles: &[&str], tenant: Option<&str>) -> Subject {
        Subject::User {
            name: "alice".into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            tenant: tenant.map(str::to_string),
        }
    }

    fn allowed(a: &Authorizer, s: &Subject, action: &str, r: &Resource) -> bool {
        a.authorize(s, action, r, &ctx()).unwrap().allowed
    }

    #[test]
    fn default_policies_validate_and_mean_what_they_say() {
        let a = Authorizer::with_defaults().unwrap();
        let c = Resource::Cluster;
        let someone = Resource::User {
            name: "bob".into(),
            roles: vec![],
            tenant: None,
        };
        let web = |tenant: Option<&str>| Resource::Image {
            name: "web".into(),
            tenant: tenant.map(str::to_string),
        };
        let vm = |tenant: &str| Resource::Vm {
            name: "web".into(),
            tenant: tenant.into(),
            labels: vec!["tier=front".into()],
        };
        let host = Resource::Node {
            id: 2,
            labels: vec![],
        };
        for action in ACTIONS.iter().filter(|a| **a != "blob:fetch") {
            let acme = Resource::Tenant {
                name: "acme".into(),
            };
            let r = match *action {
                "user:read" => &someone,
                "image:read" | "image:manage" => &web(None),
                "tenant:read" | "tenant:manage" => &acme,
                "vm:read" | "vm:manage" => &vm("acme"),
                "node:manage" => &host,
                _ => &c,
            };
            assert!(
                allowed(&a, &user(&["admin"], None), action, r),
                "admin may {action}"
            );
        }
        assert!(allowed(&a, &user(&["viewer"], None), "cluster:read", &c));
        assert!(!allowed(&a, &user(&["viewer"], None), "cluster:manage", &c));
        assert!(!allowed(
            &a,
            &user(&["operator"], Some("acme")),
            "policy:set",
            &c
        ));
        assert!(allowed(&a, &Subject::Node { id: 2 }, "node:forward", &c));
        assert!(!allowed(&a, &Subject::Node { id: 2 }, "cluster:manage", &c));
        let anon = Subject::Anonymous { key: "k".into() };
        assert!(allowed(&a, &anon, "cluster:join", &c));
        assert!(!allowed(&a, &anon, "cluster:read", &c));
        let bob = |tenant: &str| Resource::User {
            name: "bob".into(),
            roles: vec!["viewer".into()],
            tenant: Some(tenant.into()),
        };
        let op = user(&["operator"], Some("acme"));
        assert!(allowed(&a, &op, "user:read", &bob("acme")));
        assert!(!allowed(&a, &op, "user:read", &bob("other")));
        // Images: operators manage their tenant's, everyone reads shared ones, nobody
        // sees another tenant's; only nodes fetch blobs.
        assert!(allowed(&a, &op, "image:manage", &web(Some("acme"))));
        assert!(!allowed(&a, &op, "image:manage", &web(Some("other"))));
        assert!(!allowed(&a, &op, "image:read", &web(Some("other"))));
        assert!(!allowed(&a, &op, "image:manage", &web(None)));
        assert!(allowed(&a, &op, "image:read", &web(None)));
        let viewer = user(&["viewer"], Some("acme"));
        assert!(allowed(&a, &viewer, "image:read", &web(Some("acme"))));
        assert!(!allowed(&a, &viewer, "image:manage", &web(Some("acme"))));
        assert!(allowed(&a, &Subject::Node { id: 2 }, "blob:fetch", &c));
        assert!(allowed(
            &a,
            &Subject::Node { id: 2 },
            "image:read",
            &web(Some("x"))
        ));
        assert!(!allowed(&a, &user(&["admin"], None), "blob:fetch", &c));
        assert!(!allowed(&a, &anon, "blob:fetch", &c));
        // Tenants: members of a tenant read their own; only admins manage tenants.
        let tenant = |name: &str| Resource::Tenant { name: name.into() };
        assert!(allowed(&a, &op, "tenant:read", &tenant("acme")));
        assert!(allowed(&a, &viewer, "tenant:read", &tenant("acme")));
        assert!(!allowed(&a, &op, "tenant:read", &tenant("globex")));
        assert!(!allowed(&a, &op, "tenant:manage", &tenant("acme")));
        assert!(allowed(
            &a,
            &Subject::Node { id: 2 },
            "tenant:read",
            &tenant("acme")
        ));
        // VMs: operators manage their tenant's; viewers read theirs, or all when bound
        // to no tenant; hosts read them; only admins drain hosts.
        assert!(allowed(&a, &op, "vm:manage", &vm("acme")));
        assert!(!allowed(&a, &op, "vm:manage", &vm("globex")));
        assert!(!allowed(&a, &op, "vm:read", &vm("globex")));
        assert!(allowed(&a, &viewer, "vm:read", &vm("acme")));
        assert!(!allowed(&a, &viewer, "vm:manage", &vm("acme")));
        assert!(allowed(
            &a,
            &user(&["viewer"], None),
            "vm:read",
            &vm("globex")
        ));
        assert!(!allowed(
            &a,
            &user(&["operator"], None),
            "vm:manage",
            &vm("default")
        ));
        assert!(allowed(
            &a,
            &Subject::Node { id: 2 },
            "vm:read",
            &vm("acme")
        ));
        assert!(!allowed(
            &a,
            &Subject::Node { id: 2 },
            "vm:manage",
            &vm("acme")
        ));
        assert!(!allowed(&a, &op, "node:manage", &c));
        let n2 = Resource::Node {
            id: 2,
            labels: vec!["zone=a".into()],
        };
        assert!(allowed(&a, &user(&["admin"], None), "node:manage", &n2));
        assert!(!allowed(&a, &op, "node:manage", &n2));
        assert!(!allowed(&a, &Subject::Node { id: 2 }, "node:manage", &n2));
    }

    #[test]
    fn policies_can_use_vm_and_node_labels() {
        let a = Authorizer::new(
            r#"
            permit (principal is Blixard::User, action == Blixard::Action::"vm:manage", resource is Blixard::Vm)
            when { principal.roles.contains("dev") && resource.labels.contains("env=dev") };
            permit (principal is Blixard::User, action == Blixard::Action::"node:manage", resource is Blixard::Node)
            when { principal.roles.contains("rack-a") && resource has labels && resource.labels.contains("rack=a") };
            "#,
        )
        .unwrap();
        let dev = user(&["dev", "rack-a"], Some("acme"));
        let vm = |label: &str| Resource::Vm {
            name: "x".into(),
            tenant: "acme".into(),
            labels: vec![label.into()],
        };
        assert!(allowed(&a, &dev, "vm:manage", &vm("env=dev")));
        assert!(!allowed(&a, &dev, "vm:manage", &vm("env=prod")));
        let node = |label: &str| Resource::Node {
            id: 3,
            labels: vec![label.into()],
        };
        assert!(allowed(&a, &dev, "node:manage", &node("rack=a")));
        assert!(!allowed(&a, &dev, "node:manage", &node("rack=b")));
        // A node acting on itself is one entity.
        assert!(!allowed(
            &a,
            &Subject::Node { id: 3 },
            "node:manage",
            &node("rack=a")
        ));
    }

    #[test]
    fn invalid_policies_are_refused_with_the_reason() {
        assert!(matches!(
            Authorizer::new("permit(principal,"),
            Err(AuthzError::Parse(_))
        ));
        let unknown_action = r#"permit(principal, action == Blixard::Action::"vm:fly", resource);"#;
        assert!(matches!(
            Authorizer::new(unknown_action),
            Err(AuthzError::Invalid(_))
        ));
        let bad_attr = r#"permit(principal is Blixard::User, action, resource) when { principal.colour == "red" };"#;
        assert!(matches!(
            Authorizer::new(bad_attr),
            Err(AuthzError::Invalid(_))
        ));
        // Deny-all is valid: an empty set permits nothing.
        let empty = Authorizer::new("").unwrap();
        assert!(!allowed(
            &empty,
            &user(&["admin"], None),
            "cluster:read",
            &Resource::Cluster
        ));
    }
}
