//! Verdicts of the default policies and of a few custom ones, through the public API.

#![allow(clippy::unwrap_used)]

use blixard_authz::{Authorizer, AuthzError, RequestContext, Resource, Subject, ACTIONS};

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
    // What only a host does for itself (its machinery's changes) is not the admin's.
    let host_only = [
        "vm:report",
        "vm:schedule",
        "node:liveness",
        "cluster:check",
        "node:update",
        "image:hold",
    ];
    for action in ACTIONS
        .iter()
        .filter(|a| **a != "blob:fetch" && !host_only.contains(a))
    {
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
    // A host acting for itself: its machinery, and its configuration's VMs and images,
    // but not users, policies or tenants; its own addresses only. Neither a peer node nor
    // an admin may speak as a host.
    let me = Subject::Host { id: 2 };
    let other = Resource::Node {
        id: 3,
        labels: vec![],
    };
    for action in ["vm:report", "vm:schedule"] {
        assert!(allowed(&a, &me, action, &vm("acme")), "host may {action}");
        assert!(!allowed(&a, &Subject::Node { id: 2 }, action, &vm("acme")));
        assert!(!allowed(&a, &user(&["admin"], None), action, &vm("acme")));
    }
    assert!(allowed(&a, &me, "node:liveness", &other));
    assert!(allowed(&a, &me, "image:hold", &web(Some("x"))));
    assert!(allowed(&a, &me, "node:update", &host));
    assert!(!allowed(&a, &me, "node:update", &other));
    assert!(allowed(&a, &me, "vm:manage", &vm("acme")));
    assert!(allowed(&a, &me, "image:manage", &web(None)));
    assert!(!allowed(&a, &me, "user:manage", &c));
    assert!(!allowed(&a, &me, "policy:set", &c));
    assert!(!allowed(
        &a,
        &me,
        "tenant:manage",
        &Resource::Tenant {
            name: "acme".into()
        }
    ));
    assert!(!allowed(&a, &me, "node:manage", &other));
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
