//! How a [`Subject`], a [`Resource`] and a [`RequestContext`] become Cedar entities and a
//! context, with the principals already built kept for the next request.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use cedar_policy::{Context, Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression};

use crate::error::AuthzError;
use crate::schema::type_name;
use crate::types::{RequestContext, Resource, Subject};

/// The entity types [`Subject`] and [`Resource`] become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    User,
    Node,
    Host,
    Anonymous,
    Cluster,
    Tenant,
    Image,
    Vm,
}

impl Kind {
    /// How many kinds there are: the size of the tables indexed by `Kind as usize`.
    pub(crate) const COUNT: usize = Kind::ALL.len();

    pub(crate) const ALL: [Kind; 8] = [
        Kind::User,
        Kind::Node,
        Kind::Host,
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
            Kind::Host => "Host",
            Kind::Anonymous => "Anonymous",
            Kind::Cluster => "Cluster",
            Kind::Tenant => "Tenant",
            Kind::Image => "Image",
            Kind::Vm => "Vm",
        }
    }

    pub(crate) fn of_subject(subject: &Subject) -> Kind {
        match subject {
            Subject::User { .. } => Kind::User,
            Subject::Node { .. } => Kind::Node,
            Subject::Host { .. } => Kind::Host,
            Subject::Anonymous { .. } => Kind::Anonymous,
        }
    }

    pub(crate) fn of_resource(resource: &Resource) -> Kind {
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

/// How many principal entities [`EntityBuilder`] keeps before it starts over.
pub(crate) const PRINCIPALS_KEPT: usize = 256;

/// Which entities a request's store holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Store {
    /// Every entity the request names: what the schema is checked against.
    Full,
    /// Without the entities that have neither attributes nor parents (the cluster, an
    /// unknown key, an action in no group). Cedar treats an entity missing from the store
    /// as one without attributes or ancestors, and strict validation refuses policies that
    /// read an attribute such an entity does not declare, so no decision changes; every
    /// entity in the store costs on every request.
    Lean,
}

/// What a request is made of, before the action joins it.
pub(crate) struct Parts {
    pub(crate) principal: EntityUid,
    pub(crate) resource: EntityUid,
    pub(crate) entities: Vec<Entity>,
    pub(crate) context: Context,
}

/// What does not change from one request to the next: parsed type names, the cluster's
/// entity, and the principals already seen.
#[derive(Debug)]
pub(crate) struct EntityBuilder {
    /// Indexed by `Kind as usize`.
    types: [EntityTypeName; Kind::COUNT],
    cluster: Entity,
    /// The entities of users and nodes as principals: the same few callers (the node's
    /// admin credential, its peers, a handful of users) make most requests.
    principals: Mutex<HashMap<Subject, (EntityUid, Entity)>>,
}

impl EntityBuilder {
    pub(crate) fn new() -> Result<Self, AuthzError> {
        let types: [EntityTypeName; Kind::COUNT] = Kind::ALL
            .iter()
            .map(|k| type_name(k.name()))
            .collect::<Result<Vec<_>, _>>()?
            .try_into()
            .map_err(|_| AuthzError::Schema("entity types".into()))?;
        let cluster = Entity::new_no_attrs(
            EntityUid::from_type_name_and_id(
                types[Kind::Cluster as usize].clone(),
                EntityId::new("cluster"),
            ),
            HashSet::new(),
        );
        Ok(Self {
            types,
            cluster,
            principals: Mutex::new(HashMap::new()),
        })
    }

    /// The entity type `kind` stands for.
    pub(crate) fn type_of(&self, kind: Kind) -> &EntityTypeName {
        &self.types[kind as usize]
    }

    fn uid(&self, kind: Kind, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.types[kind as usize].clone(), EntityId::new(id))
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
            Subject::Host { id } => {
                let uid = self.uid(Kind::Host, &format!("n{id}"));
                let attrs = [("node_id".to_string(), long(*id))];
                (uid.clone(), entity(uid, attrs)?)
            }
            Subject::Anonymous { key } => {
                let uid = self.uid(Kind::Anonymous, key);
                (uid.clone(), Entity::new_no_attrs(uid, HashSet::new()))
            }
        })
    }

    /// [`EntityBuilder::build_principal`], from the cache for a user or a node seen before.
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
    pub(crate) fn parts(
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
