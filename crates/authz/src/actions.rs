//! The schema's actions: their names, and for a policy set, the policies that can decide
//! each action for each kind of principal and resource (scope reduction).

use std::collections::{HashMap, HashSet};

use cedar_policy::{
    ActionConstraint, Entity, EntityId, EntityTypeName, EntityUid, Policy, PolicySet,
    PrincipalConstraint, ResourceConstraint, Schema,
};

use crate::entities::{EntityBuilder, Kind};
use crate::error::AuthzError;
use crate::schema::type_name;
use crate::types::{Resource, Subject};

/// Every action in the schema, for tests and `policy test`.
pub const ACTIONS: &[&str] = &[
    "cluster:read",
    "cluster:manage",
    "cluster:backup",
    "events:read",
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
    "vm:report",
    "vm:schedule",
    "node:liveness",
    "cluster:check",
    "node:update",
    "image:hold",
];

/// One action of the schema, prepared once per policy set.
#[derive(Debug)]
pub(crate) struct ActionInfo {
    pub(crate) uid: EntityUid,
    /// The action's entity as the schema defines it (with its groups, if any).
    pub(crate) entity: Entity,
    /// Whether the action is in a group, so its entity matters to `in`.
    pub(crate) grouped: bool,
    /// By principal and resource kind (`Kind as usize`); `None` where the schema does not
    /// let the action apply.
    pub(crate) slices: [[Option<Slice>; Kind::COUNT]; Kind::COUNT],
}

/// The policies that can decide requests for one action, kind of principal and kind of
/// resource.
#[derive(Debug)]
pub(crate) struct Slice {
    /// The policies whose scope can match; the others evaluate to false without an error
    /// (Cedar checks the scope first, and no scope constraint can fail), so leaving them
    /// out changes no decision.
    pub(crate) policies: PolicySet,
    /// Whether any of `policies` reads the context; if none does, requests carry an
    /// empty one, which is cheaper to build.
    pub(crate) reads_context: bool,
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

/// The schema's actions, prepared once per policy set.
#[derive(Debug)]
pub(crate) struct Actions {
    /// The type of the actions' entities.
    action_type: EntityTypeName,
    by_name: HashMap<String, ActionInfo>,
}

impl Actions {
    /// The schema's actions, each with the policies of `policies` that can decide it.
    pub(crate) fn new(
        schema: &Schema,
        policies: &PolicySet,
        entities: &EntityBuilder,
    ) -> Result<Self, AuthzError> {
        let action_type = type_name("Action")?;
        let action_entities = schema
            .action_entities()
            .map_err(|e| AuthzError::Schema(e.to_string()))?;
        // Slicing a set with templates would have to carry the templates and their links.
        let sliceable =
            policies.num_of_templates() == 0 && policies.policies().all(|p| p.is_static());
        let all: Vec<(&Policy, bool)> =
            policies.policies().map(|p| (p, reads_context(p))).collect();
        let mut by_name = HashMap::new();
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
            let mut slices: [[Option<Slice>; Kind::COUNT]; Kind::COUNT] = Default::default();
            for p in Kind::ALL {
                let p_type = entities.type_of(p);
                if !principals.contains(&p_type) {
                    continue;
                }
                for r in Kind::ALL {
                    let r_type = entities.type_of(r);
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
            by_name.insert(
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
            action_type,
            by_name,
        })
    }

    /// The action and its policies for this principal and resource, if the schema lets it
    /// apply to them.
    pub(crate) fn get(
        &self,
        action: &str,
        subject: &Subject,
        resource: &Resource,
    ) -> Option<(&ActionInfo, &Slice)> {
        let info = self.by_name.get(action)?;
        let slice = info.slices[Kind::of_subject(subject) as usize]
            [Kind::of_resource(resource) as usize]
            .as_ref()?;
        Some((info, slice))
    }

    /// The uid of the action named `action`, whether the schema knows it or not.
    pub(crate) fn uid(&self, action: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.action_type.clone(), EntityId::new(action))
    }

    /// Every action of the schema, by name.
    #[cfg(test)]
    pub(crate) fn by_name(&self) -> &HashMap<String, ActionInfo> {
        &self.by_name
    }
}
