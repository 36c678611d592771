//! The fast path against the validated one: every shape the authorizer builds conforms to
//! the schema, and every verdict matches; the principal cache follows changes.

use cedar_policy::{Entities, Request};

use super::*;
use crate::actions::ACTIONS;
use crate::entities::{Kind, PRINCIPALS_KEPT};

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

/// Checks the request and the entities [`Authorizer::authorize`] builds against the
/// schema, as its fast path does not.
fn validate(
    a: &Authorizer,
    subject: &Subject,
    action: &str,
    resource: &Resource,
    context: &RequestContext,
) -> Result<(), AuthzError> {
    let info = a
        .actions
        .by_name()
        .get(action)
        .ok_or_else(|| AuthzError::Request("unknown action".into()))?;
    let parts = a
        .entities
        .parts(subject, resource, Some(context), Store::Full)?;
    Request::new(
        parts.principal,
        info.uid.clone(),
        parts.resource,
        parts.context,
        Some(&a.schema),
    )
    .map_err(|e| AuthzError::Request(e.to_string()))?;
    // With a schema, an action entity given must also match the schema's.
    let mut entities = parts.entities;
    entities.push(info.entity.clone());
    Entities::from_entities(entities, Some(&a.schema))
        .map_err(|e| AuthzError::Request(e.to_string()))?;
    Ok(())
}

/// Every principal shape `authorize` is asked about: the admin credential, users with
/// and without a tenant or roles, a node, a host acting for itself, an unknown key.
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
        // A host acting for itself, and the same id as a node resource below.
        Subject::Host { id: 2 },
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
                let applies = a.actions.get(action, &subject, &resource).is_some();
                let valid = validate(a, &subject, action, &resource, &context);
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
    let mut actions: Vec<&str> = a.actions.by_name().keys().map(String::as_str).collect();
    let mut expected = ACTIONS.to_vec();
    actions.sort_unstable();
    expected.sort_unstable();
    assert_eq!(actions, expected, "ACTIONS lists the schema's actions");
    // Every kind of principal and resource is the principal or the resource of an action.
    for kind in Kind::ALL {
        assert!(
            a.actions.by_name().values().any(|i| {
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
        let s = a.actions.by_name()[action].slices[p as usize][r as usize]
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
        .actions
        .get("cluster:manage", admin, &Resource::Cluster)
        .is_some());
    assert!(a
        .actions
        .get("vm:read", &Subject::Node { id: 2 }, &resources()[7])
        .is_some());
    assert!(a
        .actions
        .get("blob:fetch", admin, &Resource::Cluster)
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
            &Authorizer::new(&format!("permit (principal, action, resource);\n{forbid}")).unwrap(),
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
