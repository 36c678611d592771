//! Cedar authorization for Blixard: the schema, the default policies, how principals and
//! resources become Cedar entities, and the authorizer the API's choke point calls.
//!
//! **Boundary:** knows nothing of the network or storage; callers describe the principal,
//! the action and the resource with the plain types below.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Mutex;

use cedar_policy::{
    ActionConstraint, Authorizer as CedarAuthorizer, Context, Decision, Entities, Entity, EntityId,
    EntityTypeName, EntityUid, Policy, PolicySet, PrincipalConstraint, Request, ResourceConstraint,
    RestrictedExpression, Schema, ValidationMode, Validator,
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
    catalog: Catalog,
}

fn schema() -> Result<Schema, AuthzError> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(s, _warnings)| s)
        .map_err(|e| AuthzError::Schema(e.to_string()))
}

/// The entity types [`Subject`] and [`Resource`] become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    User,
    Node,
    Anonymous,
    Cluster,
    Tenant,
    Image,
    Vm,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::User,
        Kind::Node,
        Kind::Anonymous,
        Kind::Cluster,
        Kind::Tenant,
        Kind::Image,
        Kind::Vm,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::User => "User",
            Kind::Node => "Node",
            Kind::Anonymous => "Anonymous",
            Kind::Cluster => "Cluster",
            Kind::Tenant => "Tenant",
            Kind::Image => "Image",
            Kind::Vm => "Vm",
        }
    }

    fn of_subject(subject: &Subject) -> Kind {
        match subject {
            Subject::User { .. } => Kind::User,
            Subject::Node { .. } => Kind::Node,
            Subject::Anonymous { .. } => Kind::Anonymous,
        }
    }

    fn of_resource(resource: &Resource) -> Kind {
        match resource {
            Resource::Cluster => Kind::Cluster,
            Resource::User { .. } => Kind::User,
            Resource::Image { .. } => Kind::Image,
            Resource::Tenant { .. } => Kind::Tenant,
            Resource::Vm { .. } => Kind::Vm,
            Resource::Node { .. } => Kind::Node,
        }
    }
}

fn type_name(name: &str) -> Result<EntityTypeName, AuthzError> {
    EntityTypeName::from_str(&format!("Blixard::{name}"))
        .map_err(|e| AuthzError::Schema(e.to_string()))
}

/// One action of the schema, prepared once per policy set.
#[derive(Debug)]
struct ActionInfo {
    uid: EntityUid,
    /// The action's entity as the schema defines it (with its groups, if any).
    entity: Entity,
    /// Whether the action is in a group, so its entity matters to `in`.
    grouped: bool,
    /// By principal and resource kind (`Kind as usize`); `None` where the schema does not
    /// let the action apply.
    slices: [[Option<Slice>; 7]; 7],
}

/// The policies that can decide requests for one action, kind of principal and kind of
/// resource.
#[derive(Debug)]
struct Slice {
    /// The policies whose scope can match; the others evaluate to false without an error
    /// (Cedar checks the scope first, and no scope constraint can fail), so leaving them
    /// out changes no decision.
    policies: PolicySet,
    /// Whether any of `policies` reads the context; if none does, requests carry an
    /// empty one, which is cheaper to build.
    reads_context: bool,
}

/// Whether `policy`'s scope can match `action` (whose groups, itself included, are
/// `groups`) with a principal of type `principal` and a resource of type `resource`.
fn scope_can_match(
    policy: &Policy,
    action: &EntityUid,
    groups: &HashSet<&EntityUid>,
    principal: &EntityTypeName,
    resource: &EntityTypeName,
) -> bool {
    let principal_ok = match policy.principal_constraint() {
        PrincipalConstraint::Any | PrincipalConstraint::In(_) => true,
        PrincipalConstraint::Eq(uid) => uid.type_name() == principal,
        PrincipalConstraint::Is(ty) | PrincipalConstraint::IsIn(ty, _) => ty == *principal,
    };
    let action_ok = match policy.action_constraint() {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(uid) => uid == *action,
        ActionConstraint::In(list) => list.iter().any(|uid| groups.contains(uid)),
    };
    let resource_ok = match policy.resource_constraint() {
        ResourceConstraint::Any | ResourceConstraint::In(_) => true,
        ResourceConstraint::Eq(uid) => uid.type_name() == resource,
        ResourceConstraint::Is(ty) | ResourceConstraint::IsIn(ty, _) => ty == *resource,
    };
    principal_ok && action_ok && resource_ok
}

/// Whether `policy` mentions the variable `context` (its JSON form has `{"Var": "context"}`).
/// When unsure, it does.
fn reads_context(policy: &Policy) -> bool {
    fn mentions(json: &serde_json::Value) -> bool {
        match json {
            serde_json::Value::Object(map) => map
                .iter()
                .any(|(k, v)| (k == "Var" && v.as_str() == Some("context")) || mentions(v)),
            serde_json::Value::Array(items) => items.iter().any(mentions),
            _ => false,
        }
    }
    policy.to_json().map_or(true, |json| mentions(&json))
}

/// What does not change from one request to the next: parsed type names, the cluster's
/// entity, the schema's actions with the policies that can decide each, and the principals
/// already seen.
#[derive(Debug)]
struct Catalog {
    /// Indexed by `Kind as usize`.
    types: [EntityTypeName; 7],
    action_type: EntityTypeName,
    cluster: Entity,
    actions: HashMap<String, ActionInfo>,
    /// The entities of users and nodes as principals: the same few callers (the node's
    /// admin credential, its peers, a handful of users) make most requests.
    principals: Mutex<HashMap<Subject, (EntityUid, Entity)>>,
}

/// How many principal entities [`Catalog`] keeps before it starts over.
const PRINCIPALS_KEPT: usize = 256;

/// Which entities a request's store holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Store {
    /// Every entity the request names: what the schema is checked against.
    Full,
    /// Without the entities that have neither attributes nor parents (the cluster, an
    /// unknown key, an action in no group). Cedar treats an entity missing from the store
    /// as one without attributes or ancestors, and strict validation refuses policies that
    /// read an attribute such an entity does not declare, so no decision changes; every
    /// entity in the store costs on every request.
    Lean,
}

impl Catalog {
    fn new(schema: &Schema, policies: &PolicySet) -> Result<Self, AuthzError> {
        let types: [EntityTypeName; 7] = Kind::ALL
            .iter()
            .map(|k| type_name(k.name()))
            .collect::<Result<Vec<_>, _>>()?
            .try_into()
            .map_err(|_| AuthzError::Schema("entity types".into()))?;
        let action_type = type_name("Action")?;
        let cluster = Entity::new_no_attrs(
            EntityUid::from_type_name_and_id(
                types[Kind::Cluster as usize].clone(),
                EntityId::new("cluster"),
            ),
            HashSet::new(),
        );
        let action_entities = schema
            .action_entities()
            .map_err(|e| AuthzError::Schema(e.to_string()))?;
        // Slicing a set with templates would have to carry the templates and their links.
        let sliceable =
            policies.num_of_templates() == 0 && policies.policies().all(|p| p.is_static());
        let all: Vec<(&Policy, bool)> =
            policies.policies().map(|p| (p, reads_context(p))).collect();
        let mut actions = HashMap::new();
        for entity in action_entities.iter() {
            let uid = entity.uid();
            if *uid.type_name() != action_type {
                continue;
            }
            let mut groups: HashSet<&EntityUid> = action_entities
                .ancestors(&uid)
                .map(|a| a.collect())
                .unwrap_or_default();
            let grouped = !groups.is_empty();
            groups.insert(&uid);
            let principals: Vec<&EntityTypeName> = schema
                .principals_for_action(&uid)
                .map(|i| i.collect())
                .unwrap_or_default();
            let resources: Vec<&EntityTypeName> = schema
                .resources_for_action(&uid)
                .map(|i| i.collect())
                .unwrap_or_default();
            let mut slices: [[Option<Slice>; 7]; 7] = Default::default();
            for p in Kind::ALL {
                let p_type = &types[p as usize];
                if !principals.contains(&p_type) {
                    continue;
                }
                for r in Kind::ALL {
                    let r_type = &types[r as usize];
                    if !resources.contains(&r_type) {
                        continue;
                    }
                    slices[p as usize][r as usize] = Some(if sliceable {
                        let mut slice = Slice {
                            policies: PolicySet::new(),
                            reads_context: false,
                        };
                        for (policy, reads) in &all {
                            if scope_can_match(policy, &uid, &groups, p_type, r_type) {
                                slice.reads_context |= reads;
                                slice
                                    .policies
                                    .add((*policy).clone())
                                    .map_err(|e| AuthzError::Invalid(e.to_string()))?;
                            }
                        }
                        slice
                    } else {
                        Slice {
                            policies: policies.clone(),
                            reads_context: true,
                        }
                    });
                }
            }
            actions.insert(
                uid.id().unescaped().to_string(),
                ActionInfo {
                    uid: uid.clone(),
                    entity: entity.clone(),
                    grouped,
                    slices,
                },
            );
        }
        Ok(Self {
            types,
            action_type,
            cluster,
            actions,
            principals: Mutex::new(HashMap::new()),
        })
    }

    fn uid(&self, kind: Kind, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.types[kind as usize].clone(), EntityId::new(id))
    }

    /// The action and its policies for this principal and resource, if the schema lets it
    /// apply to them.
    fn action(
        &self,
        action: &str,
        subject: &Subject,
        resource: &Resource,
    ) -> Option<(&ActionInfo, &Slice)> {
        let info = self.actions.get(action)?;
        let slice = info.slices[Kind::of_subject(subject) as usize]
            [Kind::of_resource(resource) as usize]
            .as_ref()?;
        Some((info, slice))
    }

    fn user(
        &self,
        name: &str,
        roles: &[String],
        tenant: Option<&str>,
    ) -> Result<(EntityUid, Entity), AuthzError> {
        let uid = self.uid(Kind::User, name);
        let attrs = [
            ("roles".to_string(), string_set(roles)),
            (
                "tenant".to_string(),
                RestrictedExpression::new_string(tenant.unwrap_or_default().to_string()),
            ),
        ];
        Ok((uid.clone(), entity(uid, attrs)?))
    }

    /// The principal and its entity.
    fn build_principal(&self, subject: &Subject) -> Result<(EntityUid, Entity), AuthzError> {
        Ok(match subject {
            Subject::User {
                name,
                roles,
                tenant,
            } => self.user(name, roles, tenant.as_deref())?,
            Subject::Node { id } => {
                let uid = self.uid(Kind::Node, &format!("n{id}"));
                let attrs = [("node_id".to_string(), long(*id))];
                (uid.clone(), entity(uid, attrs)?)
            }
            Subject::Anonymous { key } => {
                let uid = self.uid(Kind::Anonymous, key);
                (uid.clone(), Entity::new_no_attrs(uid, HashSet::new()))
            }
        })
    }

    /// [`Catalog::build_principal`], from the cache for a user or a node seen before.
    /// (Unknown keys are not kept: anyone can make up new ones.)
    fn principal(&self, subject: &Subject) -> Result<(EntityUid, Entity), AuthzError> {
        if let Subject::Anonymous { .. } = subject {
            return self.build_principal(subject);
        }
        // A poisoned cache is only skipped: its entries are whole, but not needed.
        let mut cache = self.principals.lock().ok();
        if let Some(found) = cache.as_ref().and_then(|c| c.get(subject)) {
            return Ok(found.clone());
        }
        let built = self.build_principal(subject)?;
        if let Some(cache) = cache.as_mut() {
            if cache.len() >= PRINCIPALS_KEPT {
                cache.clear();
            }
            cache.insert(subject.clone(), built.clone());
        }
        Ok(built)
    }

    /// The principal, the resource and the entities they are, and the context.
    fn parts(
        &self,
        subject: &Subject,
        resource: &Resource,
        context: Option<&RequestContext>,
        store: Store,
    ) -> Result<Parts, AuthzError> {
        // The principal's and the resource's, and room for the action's.
        let mut entities = Vec::with_capacity(3);
        let principal = match (subject, store) {
            (Subject::Anonymous { key }, Store::Lean) => self.uid(Kind::Anonymous, key),
            _ => {
                let (uid, e) = self.principal(subject)?;
                entities.push(e);
                uid
            }
        };
        let resource = match resource {
            Resource::Cluster => {
                if store == Store::Full {
                    entities.push(self.cluster.clone());
                }
                self.cluster.uid()
            }
            Resource::User {
                name,
                roles,
                tenant,
            } => {
                let uid = self.uid(Kind::User, name);
                // A user acting on themselves: one entity.
                if uid != principal {
                    entities.push(self.user(name, roles, tenant.as_deref())?.1);
                }
                uid
            }
            Resource::Tenant { name } => {
                let uid = self.uid(Kind::Tenant, name);
                let attrs = [(
                    "name".to_string(),
                    RestrictedExpression::new_string(name.clone()),
                )];
                entities.push(entity(uid.clone(), attrs)?);
                uid
            }
            Resource::Image { name, tenant } => {
                let uid = self.uid(Kind::Image, name);
                let tenant = tenant.clone().unwrap_or_default();
                let attrs = [(
                    "tenant".to_string(),
                    RestrictedExpression::new_string(tenant),
                )];
                entities.push(entity(uid.clone(), attrs)?);
                uid
            }
            Resource::Vm {
                name,
                tenant,
                labels,
            } => {
                let uid = self.uid(Kind::Vm, &format!("{tenant}/{name}"));
                let attrs = [
                    (
                        "tenant".to_string(),
                        RestrictedExpression::new_string(tenant.clone()),
                    ),
                    ("labels".to_string(), string_set(labels)),
                ];
                entities.push(entity(uid.clone(), attrs)?);
                uid
            }
            Resource::Node { id, labels } => {
                let uid = self.uid(Kind::Node, &format!("n{id}"));
                let attrs = [
                    ("node_id".to_string(), long(*id)),
                    ("labels".to_string(), string_set(labels)),
                ];
                // A node acting on itself: one entity, with the labels.
                if uid == principal {
                    entities.clear();
                }
                entities.push(entity(uid.clone(), attrs)?);
                uid
            }
        };
        let context = match context {
            Some(context) => Context::from_pairs([
                ("time".to_string(), long(context.time_ms)),
                (
                    "source".to_string(),
                    RestrictedExpression::new_string(context.source.clone()),
                ),
            ])
            .map_err(|e| AuthzError::Request(e.to_string()))?,
            None => Context::empty(),
        };
        Ok(Parts {
            principal,
            resource,
            entities,
            context,
        })
    }
}

/// What a request is made of, before the action joins it.
struct Parts {
    principal: EntityUid,
    resource: EntityUid,
    entities: Vec<Entity>,
    context: Context,
}

fn entity<const N: usize>(
    uid: EntityUid,
    attrs: [(String, RestrictedExpression); N],
) -> Result<Entity, AuthzError> {
    Entity::new_with_tags(uid, attrs, [], []).map_err(|e| AuthzError::Request(e.to_string()))
}

fn long(n: u64) -> RestrictedExpression {
    RestrictedExpression::new_long(i64::try_from(n).unwrap_or(i64::MAX))
}

fn string_set(items: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(
        items
            .iter()
            .map(|i| RestrictedExpression::new_string(i.clone())),
    )
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
        let catalog = Catalog::new(&schema, &policies)?;
        Ok(Self {
            schema,
            policies,
            text: text.to_string(),
            cedar: CedarAuthorizer::new(),
            catalog,
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
        let Some((info, slice)) = self.catalog.action(action, subject, resource) else {
            return self.authorize_validated(subject, action, resource, context);
        };
        let parts = self.catalog.parts(
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
            .catalog
            .parts(subject, resource, Some(context), Store::Full)?;
        let action = EntityUid::from_type_name_and_id(
            self.catalog.action_type.clone(),
            EntityId::new(action),
        );
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

    /// Checks the request and the entities [`Authorizer::authorize`] builds against the
    /// schema, as its fast path does not.
    #[cfg(test)]
    fn validate(
        &self,
        subject: &Subject,
        action: &str,
        resource: &Resource,
        context: &RequestContext,
    ) -> Result<(), String> {
        let info = self.catalog.actions.get(action).ok_or("unknown action")?;
        let parts = self
            .catalog
            .parts(subject, resource, Some(context), Store::Full)
            .map_err(|e| e.to_string())?;
        Request::new(
            parts.principal,
            info.uid.clone(),
            parts.resource,
            parts.context,
            Some(&self.schema),
        )
        .map_err(|e| e.to_string())?;
        // With a schema, an action entity given must also match the schema's.
        let mut entities = parts.entities;
        entities.push(info.entity.clone());
        Entities::from_entities(entities, Some(&self.schema)).map_err(|e| e.to_string())?;
        Ok(())
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

    /// Every principal shape `authorize` is asked about: the admin credential, users with
    /// and without a tenant or roles, a host, an unknown key.
    fn subjects() -> Vec<Subject> {
        vec![
            Subject::User {
                name: "admin-n1".into(),
                roles: vec!["admin".into()],
                tenant: None,
            },
            user(&["operator", "dev"], Some("acme")),
            user(&["viewer"], None),
            user(&[], None),
            Subject::Node { id: 2 },
            Subject::Anonymous {
                key: "ab".repeat(32),
            },
            // The same user as a resource below, with other attributes than it has there.
            Subject::User {
                name: "bob".into(),
                roles: vec!["admin".into()],
                tenant: None,
            },
            Subject::Node { id: 3 },
        ]
    }

    /// Every resource shape, including a user and a host that are also the principal.
    fn resources() -> Vec<Resource> {
        vec![
            Resource::Cluster,
            Resource::User {
                name: "bob".into(),
                roles: vec!["viewer".into()],
                tenant: Some("acme".into()),
            },
            Resource::User {
                name: "alice".into(),
                roles: vec!["operator".into(), "dev".into()],
                tenant: Some("acme".into()),
            },
            Resource::User {
                name: "carol".into(),
                roles: vec![],
                tenant: None,
            },
            Resource::Image {
                name: "web".into(),
                tenant: Some("acme".into()),
            },
            Resource::Image {
                name: "base".into(),
                tenant: None,
            },
            Resource::Tenant {
                name: "acme".into(),
            },
            Resource::Vm {
                name: "web".into(),
                tenant: "acme".into(),
                labels: vec!["tier=front".into(), "env=dev".into()],
            },
            Resource::Vm {
                name: "db".into(),
                tenant: "default".into(),
                labels: vec![],
            },
            Resource::Node {
                id: 2,
                labels: vec!["zone=a".into()],
            },
            Resource::Node {
                id: 3,
                labels: vec![],
            },
        ]
    }

    /// A verdict with its reasons and errors in a stable order.
    fn sorted(mut v: Verdict) -> Verdict {
        v.reasons.sort();
        v.errors.sort();
        v
    }

    /// For every action, principal and resource: the entities and the request `authorize`
    /// builds conform to the schema exactly when the schema lets the action apply (so the
    /// fast path, which does not validate, is only taken for valid requests), and the fast
    /// path decides as the validated one with all the policies does.
    fn check_every_shape(a: &Authorizer) {
        let context = RequestContext {
            time_ms: u64::MAX,
            source: "cd".repeat(32),
        };
        for action in ACTIONS {
            for subject in subjects() {
                for resource in resources() {
                    let what = format!("{subject:?} {action} {resource:?}");
                    let applies = a.catalog.action(action, &subject, &resource).is_some();
                    let valid = a.validate(&subject, action, &resource, &context);
                    assert_eq!(applies, valid.is_ok(), "{what}: {valid:?}");
                    let fast = a.authorize(&subject, action, &resource, &context).unwrap();
                    let slow = a
                        .authorize_validated(&subject, action, &resource, &context)
                        .unwrap();
                    assert_eq!(sorted(fast), sorted(slow), "{what}");
                }
            }
        }
    }

    #[test]
    fn every_entity_and_request_shape_conforms_to_the_schema() {
        let a = Authorizer::with_defaults().unwrap();
        let mut actions: Vec<&str> = a.catalog.actions.keys().map(String::as_str).collect();
        let mut expected = ACTIONS.to_vec();
        actions.sort_unstable();
        expected.sort_unstable();
        assert_eq!(actions, expected, "ACTIONS lists the schema's actions");
        // Every kind of principal and resource is the principal or the resource of an action.
        for kind in Kind::ALL {
            assert!(
                a.catalog.actions.values().any(|i| {
                    (0..7).any(|other| {
                        i.slices[kind as usize][other].is_some()
                            || i.slices[other][kind as usize].is_some()
                    })
                }),
                "{kind:?}"
            );
        }
        check_every_shape(&a);
        // Policies with forbids, action lists, `==` scopes, and errors (the time overflows).
        let custom = Authorizer::new(
            r#"
            permit (principal, action in [Blixard::Action::"vm:read", Blixard::Action::"vm:manage"], resource is Blixard::Vm)
            when { resource.labels.contains("env=dev") };
            forbid (principal is Blixard::User, action == Blixard::Action::"vm:manage", resource)
            unless { principal.roles.contains("dev") };
            permit (principal is Blixard::User, action == Blixard::Action::"node:manage", resource is Blixard::Node)
            when { resource has labels && resource.labels.contains("zone=a") };
            permit (principal, action, resource) when { context.time + 1 > 0 && context.source != "" };
            permit (principal == Blixard::User::"alice", action == Blixard::Action::"user:read", resource);
            forbid (principal is Blixard::Node, action, resource == Blixard::Vm::"acme/web");
            "#,
        )
        .unwrap();
        check_every_shape(&custom);
        // Each action is judged by its own policies, with a context only when they read it.
        let slice = |a: &Authorizer, p: Kind, action: &str, r: Kind| {
            let s = a.catalog.actions[action].slices[p as usize][r as usize]
                .as_ref()
                .unwrap();
            (s.policies.policies().count(), s.reads_context)
        };
        assert_eq!(
            slice(&a, Kind::User, "cluster:manage", Kind::Cluster),
            (1, false)
        );
        assert_eq!(slice(&a, Kind::User, "vm:read", Kind::Vm), (2, false));
        assert_eq!(slice(&a, Kind::Node, "vm:read", Kind::Vm), (1, false));
        assert_eq!(
            slice(&a, Kind::Node, "cluster:read", Kind::Cluster),
            (1, false)
        );
        assert_eq!(slice(&custom, Kind::User, "vm:read", Kind::Vm), (2, true));
        assert_eq!(slice(&custom, Kind::Node, "vm:manage", Kind::Vm), (3, true));
        assert_eq!(
            slice(&custom, Kind::User, "cluster:read", Kind::Cluster),
            (1, true)
        );
        // The fast path is taken for the requests the daemon makes all the time.
        let admin = &subjects()[0];
        assert!(a
            .catalog
            .action("cluster:manage", admin, &Resource::Cluster)
            .is_some());
        assert!(a
            .catalog
            .action("vm:read", &Subject::Node { id: 2 }, &resources()[7])
            .is_some());
        assert!(a
            .catalog
            .action("blob:fetch", admin, &Resource::Cluster)
            .is_none());
    }

    /// Policies an operator could install, one scope and one condition at a time, as a
    /// permit and as a forbid (next to a permit-all, so a forbid the slicing dropped would
    /// show as an allow): the fast path decides as the validated one with all the policies.
    #[test]
    fn fast_path_matches_validated_path_for_tricky_policies() {
        let scopes = [
            "principal, action, resource",
            r#"principal in Blixard::Tenant::"acme", action, resource"#,
            r#"principal in Blixard::User::"alice", action, resource"#,
            r#"principal == Blixard::Node::"n2", action, resource"#,
            r#"principal is Blixard::Anonymous, action == Blixard::Action::"cluster:join", resource"#,
            r#"principal is Blixard::User in Blixard::Tenant::"acme", action, resource"#,
            r#"principal is Blixard::Node in Blixard::Node::"n2", action, resource is Blixard::Node in Blixard::Node::"n2""#,
            r#"principal, action in [Blixard::Action::"vm:read", Blixard::Action::"user:manage"], resource"#,
            r#"principal, action in Blixard::Action::"user:manage", resource in Blixard::Cluster::"cluster""#,
            "principal, action, resource is Blixard::User",
            r#"principal, action, resource == Blixard::User::"alice""#,
            r#"principal, action, resource in Blixard::Vm::"acme/web""#,
            r#"principal, action, resource in Blixard::Tenant::"acme""#,
            "principal is Blixard::Node, action, resource is Blixard::Node",
        ];
        let conditions = [
            "",
            "when { principal == resource }",
            "when { resource in principal }",
            "unless { principal in resource }",
            "when { principal has tenant }",
            "unless { resource has labels }",
            r#"when { principal.hasTag("x") || resource.hasTag("y") }"#,
            r#"when { Blixard::Cluster::"cluster" has name }"#,
            r#"when { Blixard::User::"bob".roles.contains("viewer") }"#,
            r#"unless { Blixard::User::"alice" has roles }"#,
            r#"when { action == Blixard::Action::"cluster:join" }"#,
            r#"when { action in Blixard::Action::"user:manage" }"#,
            r#"when { action in [Blixard::Action::"user:manage", Blixard::Action::"vm:read"] }"#,
            "when { principal is Blixard::Anonymous }",
            "unless { resource is Blixard::Cluster || resource is Blixard::Node }",
            "when { context.time > 5 }",
            r#"unless { context has source && context.source like "cd*" }"#,
            "when { context.time + 1 > 0 }",
            r#"when { if principal is Blixard::User then principal.roles.contains("admin") else true }"#,
            r#"when { if resource is Blixard::Node then resource has labels && resource.labels.contains("zone=a") else false }"#,
            r#"when { principal is Blixard::Node && resource is Blixard::Node && principal.node_id == resource.node_id }"#,
            r#"unless { principal is Blixard::User && resource is Blixard::User && principal.tenant == resource.tenant }"#,
            r#"when { principal in Blixard::Cluster::"cluster" || resource in Blixard::Anonymous::"x" }"#,
        ];
        // Verdicts carry every policy that decided them (all the satisfied permits of an
        // allow, all the satisfied forbids of a deny) and every policy that failed, so a
        // set of many permits, or a permit-all with many forbids, shows any one dropped.
        let mut permits = Vec::new();
        let mut forbids = Vec::new();
        for scope in scopes {
            let mut scope_permits = Vec::new();
            let mut scope_forbids = Vec::new();
            for condition in conditions {
                let permit = format!("permit ({scope}) {condition};");
                if Authorizer::new(&permit).is_ok() {
                    scope_permits.push(permit);
                    scope_forbids.push(format!("forbid ({scope}) {condition};"));
                }
            }
            assert!(scope_permits.len() > 5, "{scope}: {scope_permits:?}");
            check_every_shape(&Authorizer::new(&scope_permits.join("\n")).unwrap());
            let forbid_set = format!(
                "permit (principal, action, resource);\n{}",
                scope_forbids.join("\n")
            );
            check_every_shape(&Authorizer::new(&forbid_set).unwrap());
            permits.extend(scope_permits);
            forbids.extend(scope_forbids);
        }
        check_every_shape(&Authorizer::new(&permits.join("\n")).unwrap());
        check_every_shape(&Authorizer::new(&forbids.join("\n")).unwrap());
        // One of each alone, as a permit and as a forbid.
        for (permit, forbid) in permits.iter().zip(&forbids).step_by(7) {
            check_every_shape(&Authorizer::new(permit).unwrap());
            check_every_shape(
                &Authorizer::new(&format!("permit (principal, action, resource);\n{forbid}"))
                    .unwrap(),
            );
        }
    }

    /// Templates (which the slicing leaves alone) next to static policies.
    #[test]
    fn fast_path_matches_validated_path_with_templates() {
        let a = Authorizer::new(
            r#"
            permit (principal == ?principal, action, resource);
            forbid (principal, action, resource in ?resource);
            permit (principal is Blixard::User, action, resource) when { principal.roles.contains("admin") };
            forbid (principal, action == Blixard::Action::"policy:set", resource) unless { context.time > 0 };
            "#,
        )
        .unwrap();
        check_every_shape(&a);
    }

    /// The principal cache is keyed by everything the entity holds: a user whose roles or
    /// tenant change is judged by the new ones, and a policy change starts a new cache.
    #[test]
    fn cached_principals_follow_role_and_tenant_changes() {
        let a = Authorizer::new(
            r#"
            permit (principal is Blixard::User, action == Blixard::Action::"vm:read", resource is Blixard::Vm)
            when { principal.roles.contains("viewer") && resource.tenant == principal.tenant };
            "#,
        )
        .unwrap();
        let vm = Resource::Vm {
            name: "web".into(),
            tenant: "acme".into(),
            labels: vec![],
        };
        let alice = |roles: &[&str], tenant| user(roles, tenant);
        for _ in 0..2 {
            assert!(allowed(
                &a,
                &alice(&["viewer"], Some("acme")),
                "vm:read",
                &vm
            ));
            assert!(!allowed(&a, &alice(&[], Some("acme")), "vm:read", &vm));
            assert!(!allowed(
                &a,
                &alice(&["viewer"], Some("globex")),
                "vm:read",
                &vm
            ));
            assert!(!allowed(&a, &alice(&["viewer"], None), "vm:read", &vm));
        }
        // Past the cache's size, it starts over and still answers the same.
        for i in 0..(PRINCIPALS_KEPT + 10) {
            let s = Subject::User {
                name: format!("u{i}"),
                roles: vec!["viewer".into()],
                tenant: Some(if i % 2 == 0 { "acme" } else { "globex" }.into()),
            };
            assert_eq!(allowed(&a, &s, "vm:read", &vm), i % 2 == 0, "u{i}");
        }
        assert!(allowed(
            &a,
            &alice(&["viewer"], Some("acme")),
            "vm:read",
            &vm
        ));
        // New policies, new authorizer: what the old one cached does not leak.
        let b = Authorizer::new(
            r#"forbid (principal, action, resource);
            permit (principal, action, resource);"#,
        )
        .unwrap();
        assert!(!allowed(
            &b,
            &alice(&["viewer"], Some("acme")),
            "vm:read",
            &vm
        ));
        check_every_shape(&a);
        check_every_shape(&b);
    }
}
