//! Authorization on a real 3-node cluster: every request kind × every kind of caller.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use blixard_core::{EndpointKey, NodeId};
use blixard_net::api::{
    ApiError, CacheKeyGet, ImageImport, ImageList, ImagePin, ImagePull, ImageRemove, ImageShow,
    JoinCluster, LeaveCluster, MetaGet, MetaSet, NodeList, PolicyGet, PolicySet, PolicyTest,
    QuotaSet, QuotaShow, Request, RequestFrame, StatusRequest, TenantCreate, TenantList,
    TokenCreate, UserAdd, UserList, UserRemove,
};
use blixard_net::client::{ApiClient, ClientError};
use blixard_net::{endpoint, key_of, keys, EndpointAddr, SecretKey};
use blixard_tests::{api, wait_for, Cluster, Node};

fn key_hex(k: &SecretKey) -> String {
    key_of(&k.public()).to_string()
}

fn add_user(admin: &Node, name: &str, key: &SecretKey, role: &str, tenant: Option<&str>) {
    let hex = key_hex(key);
    let mut args = vec!["user", "add", name, "--key", &hex, "--role", role];
    if let Some(t) = tenant {
        args.extend(["--tenant", t]);
    }
    admin.cli_ok(&args);
}

fn addr_of(node: &Node) -> EndpointAddr {
    api::addr_of(node).1
}

async fn client(secret: SecretKey) -> ApiClient {
    api::client_as(secret, Duration::from_secs(10)).await
}

/// One request of every kind. Each is harmless when allowed (it names nothing that exists,
/// or rewrites what is already there), so the matrix can run them all in any order.
fn every_request(who: &str) -> Vec<Request> {
    vec![
        StatusRequest { stale: false }.into(),
        MetaGet {
            key: None,
            stale: false,
        }
        .into(),
        MetaSet {
            key: format!("matrix-{who}"),
            value: Some("1".into()),
        }
        .into(),
        TokenCreate { ttl_secs: 60 }.into(),
        JoinCluster {
            secret: [0; 32],
            endpoint: EndpointKey([0; 32]),
            name: "nobody".into(),
            addrs: vec![],
            labels: Default::default(),
            capacity: Default::default(),
            admin: EndpointKey([1; 32]),
        }
        .into(),
        LeaveCluster { node: NodeId(99) }.into(),
        UserAdd {
            name: format!("new-{who}"),
            key: key_of(&SecretKey::generate().public()),
            roles: vec!["viewer".into()],
            tenant: None,
        }
        .into(),
        UserRemove {
            name: "nobody".into(),
        }
        .into(),
        UserList { stale: false }.into(),
        PolicyGet {}.into(),
        PolicySet {
            text: blixard_authz::DEFAULT_POLICIES.into(),
        }
        .into(),
        PolicyTest {
            principal: "node:1".into(),
            action: "cluster:read".into(),
            resource: "cluster".into(),
        }
        .into(),
        // Images: the caller's own tenant for imports (a path that does not exist), and
        // an image that does not exist (so a shared one) for the rest.
        ImageImport {
            name: format!("matrix-{who}"),
            path: "/nonexistent/matrix".into(),
            tenant: None,
            pin: false,
        }
        .into(),
        ImageList { stale: false }.into(),
        ImageShow {
            name: "nothing".into(),
            stale: false,
        }
        .into(),
        ImagePull {
            name: "nothing".into(),
            node: None,
        }
        .into(),
        ImagePin {
            name: "nothing".into(),
            pinned: true,
        }
        .into(),
        ImageRemove {
            name: "nothing".into(),
        }
        .into(),
        CacheKeyGet {}.into(),
        TenantCreate {
            name: format!("matrix-{who}"),
        }
        .into(),
        TenantList { stale: false }.into(),
        QuotaSet {
            tenant: "nothing".into(),
            quota: blixard_core::Quota {
                max_vms: Some(1),
                ..Default::default()
            },
        }
        .into(),
        QuotaShow {
            tenant: "acme".into(),
            stale: false,
        }
        .into(),
        NodeList { stale: false }.into(),
        blixard_net::api::UserSetKey {
            name: "nobody".into(),
            key: key_of(&SecretKey::generate().public()),
        }
        .into(),
        blixard_net::api::AdminSetKey {
            node: NodeId(99),
            key: key_of(&SecretKey::generate().public()),
        }
        .into(),
        // VMs: a create in the caller's own tenant (of an image that does not exist), the
        // rest on a VM of tenant acme that does not exist.
        blixard_net::api::VmCreate {
            spec: vm_spec(&format!("matrix-{who}"), "", "nothing"),
            start: false,
        }
        .into(),
        blixard_net::api::VmList {
            tenant: None,
            node: None,
            stale: false,
        }
        .into(),
        blixard_net::api::VmShow {
            vm: acme_vm(),
            stale: false,
        }
        .into(),
        blixard_net::api::VmControl {
            vm: acme_vm(),
            op: blixard_net::api::VmOp::Stop,
        }
        .into(),
        blixard_net::api::VmDelete { vm: acme_vm() }.into(),
        blixard_net::api::VmLogs {
            vm: acme_vm(),
            lines: 10,
            from: None,
        }
        .into(),
        blixard_net::api::NodeDrain {
            node: NodeId(99),
            drained: false,
        }
        .into(),
        blixard_net::api::NodeStatsRequest {}.into(),
        blixard_net::api::BackupRequest {}.into(),
        blixard_net::api::TenantRemove {
            name: "nothing".into(),
        }
        .into(),
        blixard_net::api::TokenListRequest { stale: false }.into(),
        blixard_net::api::TokenRevoke {
            id: "00000000".into(),
        }
        .into(),
        blixard_net::api::EventsRequest {
            after: None,
            topics: vec![],
            wait_ms: 0,
        }
        .into(),
        blixard_net::api::LearnerTokenCreate { ttl_secs: 60 }.into(),
        blixard_net::api::RoleSet {
            node: NodeId(99),
            role: blixard_core::MemberRole::Voter,
        }
        .into(),
    ]
}

/// A small VM spec (`tenant` empty: the caller's).
fn vm_spec(name: &str, tenant: &str, image: &str) -> Box<blixard_core::VmSpec> {
    Box::new(blixard_core::VmSpec {
        name: name.into(),
        tenant: tenant.into(),
        image: image.into(),
        vcpus: 1,
        memory_mib: 64,
        labels: Default::default(),
        constraints: Default::default(),
        anti_affinity: None,
        restart: blixard_core::RestartPolicy::Never,
        ready_marker: None,
    })
}

fn acme_vm() -> blixard_net::api::VmRef {
    blixard_net::api::VmRef {
        name: "nothing".into(),
        tenant: Some("acme".into()),
    }
}

/// Sends `request` and says whether the choke point let it through (a request that was
/// let through may still fail on its merits, e.g. an unknown join token).
async fn allowed(client: &ApiClient, to: &EndpointAddr, request: Request) -> bool {
    let kind = request.kind();
    match client
        .call_frame(to, RequestFrame::new(None, request))
        .await
    {
        Ok(Ok(_)) => true,
        Ok(Err(ApiError::Unauthorized { .. })) => false,
        Ok(Err(ApiError::Rejected(_) | ApiError::BadRequest(_) | ApiError::NotFound(_))) => true,
        Ok(Err(other)) => panic!("{kind}: unexpected error {other}"),
        Err(ClientError::Api(e)) => panic!("{kind}: {e}"),
        Err(e) => panic!("{kind}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix_on_a_real_cluster() {
    let c = tokio::task::spawn_blocking(|| Cluster::start(3, &[]))
        .await
        .unwrap();
    let admin_node = &c.nodes[0];
    let viewer = SecretKey::generate();
    let operator = SecretKey::generate();
    let other_operator = SecretKey::generate();
    let admin = SecretKey::generate();
    let removed = SecretKey::generate();
    add_user(admin_node, "vera", &viewer, "viewer", Some("acme"));
    add_user(admin_node, "otto", &operator, "operator", Some("acme"));
    add_user(
        admin_node,
        "olga",
        &other_operator,
        "operator",
        Some("globex"),
    );
    add_user(admin_node, "ada", &admin, "admin", None);
    add_user(admin_node, "rex", &removed, "operator", Some("acme"));
    admin_node.cli_ok(&["user", "rm", "rex"]);
    let node_key = keys::load(&c.nodes[2].dir.join("node.key")).unwrap();

    // Requests go to node 2; node 3's own key is the member node.
    let to = addr_of(&c.nodes[1]);
    let kinds: Vec<&str> = every_request("x").iter().map(|r| r.kind()).collect();
    //            Status MetaGet MetaSet Token Join Leave UAdd URm ULst PGet PSet PTest
    //            IImport IList IShow IPull IPin IRm CacheKey
    //            TCreate TList QSet QShow NList USetKey ASetKey
    //            VCreate VList VShow VControl VDelete VLogs NDrain NStats Backup TRm
    //            KList KRevoke Events (every tenant's changes: admins and unbound
    //            viewers and operators only; all the users here but the admin are bound)
    //            LearnerToken RoleSet
    let (t, f) = (true, false);
    let expect: [(&str, SecretKey, [bool; 41]); 7] = [
        (
            "anonymous",
            SecretKey::generate(),
            [
                f, f, f, f, t, f, f, f, f, f, f, f, //
                f, f, f, f, f, f, f, //
                f, f, f, f, f, f, f, //
                f, f, f, f, f, f, f, f, f, f, f, f, f, f, f,
            ],
        ),
        (
            "unknown key",
            removed.clone(),
            [
                f, f, f, f, t, f, f, f, f, f, f, f, //
                f, f, f, f, f, f, f, //
                f, f, f, f, f, f, f, //
                f, f, f, f, f, f, f, f, f, f, f, f, f, f, f,
            ],
        ),
        (
            "viewer",
            viewer.clone(),
            [
                t, t, f, f, t, f, f, f, t, f, f, f, //
                f, t, t, f, f, f, t, //
                f, t, f, t, t, f, f, //
                f, t, t, f, f, t, f, t, f, f, f, f, f, f, f,
            ],
        ),
        (
            "operator of another tenant",
            other_operator.clone(),
            [
                t, t, f, f, t, f, f, f, t, f, f, f, //
                t, t, t, f, f, f, t, //
                f, t, f, f, t, f, f, //
                t, t, f, f, f, f, f, t, f, f, f, f, f, f, f,
            ],
        ),
        (
            "operator",
            operator.clone(),
            [
                t, t, f, f, t, f, f, f, t, f, f, f, //
                t, t, t, f, f, f, t, //
                f, t, f, t, t, f, f, //
                t, t, t, t, t, t, f, t, f, f, f, f, f, f, f,
            ],
        ),
        (
            "admin",
            admin.clone(),
            [
                t, t, t, t, t, t, t, t, t, t, t, t, //
                t, t, t, t, t, t, t, //
                t, t, t, t, t, t, t, //
                t, t, t, t, t, t, t, t, t, t, t, t, t, t, t,
            ],
        ),
        (
            "member node",
            node_key,
            [
                t, t, f, f, t, f, f, f, f, f, f, f, //
                f, t, t, f, f, f, t, //
                f, t, f, t, t, f, f, //
                f, t, t, f, f, t, f, t, f, f, f, f, f, f, f,
            ],
        ),
    ];
    let mut failures = Vec::new();
    for (who, key, row) in expect {
        let client = client(key).await;
        for (i, request) in every_request(&who.replace(' ', "-"))
            .into_iter()
            .enumerate()
        {
            let got = allowed(&client, &to, request).await;
            if got != row[i] {
                failures.push(format!(
                    "{who} × {}: expected {}, got {}",
                    kinds[i], row[i], got
                ));
            }
        }
        client.endpoint().close().await;
    }
    assert!(
        failures.is_empty(),
        "authorization matrix:\n{}",
        failures.join("\n")
    );

    // List results are filtered by authorization, not only refused.
    let names = |users: Vec<blixard_core::User>| {
        let mut n: Vec<String> = users.into_iter().map(|u| u.name).collect();
        n.sort();
        n
    };
    let list = |key: SecretKey| {
        let to = to.clone();
        async move {
            let client = client(key).await;
            let users = client
                .call(&to, UserList { stale: false })
                .await
                .unwrap()
                .users;
            client.endpoint().close().await;
            names(users)
        }
    };
    assert_eq!(
        list(operator.clone()).await,
        ["otto", "vera"],
        "operator of acme sees acme"
    );
    assert_eq!(
        list(other_operator.clone()).await,
        ["olga"],
        "operator of globex sees globex"
    );
    assert_eq!(
        list(viewer.clone()).await,
        ["vera"],
        "a viewer sees only itself"
    );
    assert!(
        list(admin.clone()).await.len() >= 4,
        "an admin sees everyone"
    );

    // A denial names the action and resource, and nothing about other tenants.
    let client_v = client(viewer.clone()).await;
    let err = client_v
        .call(
            &to,
            UserRemove {
                name: "olga".into(),
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("user:manage"), "{err}");
    client_v.endpoint().close().await;

    // Images of a tenant are seen by that tenant (and admins) only.
    let src = c.root.path().join("globex-image");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("file"), "globex\n").unwrap();
    // An import reads the node's files: users may only import from images.import_paths
    // (the Nix store by default); the node's own admin credential may import from anywhere.
    let client_o = client(other_operator.clone()).await;
    let err = client_o
        .call(
            &to,
            ImageImport {
                name: "sneaky".into(),
                path: src.display().to_string(),
                tenant: None,
                pin: false,
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("import_paths"), "{err}");
    client_o.endpoint().close().await;
    let node_admin = keys::load(&c.nodes[1].dir.join("admin.key")).unwrap();
    let client_a = client(node_admin).await;
    let image = client_a
        .call(
            &to,
            ImageImport {
                name: "globex-web".into(),
                path: src.display().to_string(),
                tenant: Some("globex".into()),
                pin: false,
            },
        )
        .await
        .unwrap()
        .image;
    client_a.endpoint().close().await;
    let images = |key: SecretKey| {
        let to = to.clone();
        async move {
            let client = client(key).await;
            let images = client
                .call(&to, ImageList { stale: false })
                .await
                .unwrap()
                .images;
            client.endpoint().close().await;
            images.into_iter().map(|i| i.name).collect::<Vec<_>>()
        }
    };
    assert_eq!(images(other_operator.clone()).await, ["globex-web"]);
    assert!(images(operator.clone()).await.is_empty());
    assert!(images(viewer.clone()).await.is_empty());
    let client_o = client(operator.clone()).await;
    let err = client_o
        .call(
            &to,
            ImageRemove {
                name: "globex-web".into(),
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("image:manage"), "{err}");
    // Nor can acme's operator boot globex's image: to it, the image does not exist.
    let err = client_o
        .call(
            &to,
            blixard_net::api::VmCreate {
                spec: vm_spec("borrowed", "", "globex-web"),
                start: false,
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no image globex-web"), "{err}");
    client_o.endpoint().close().await;

    // VMs: each tenant sees its own in `vm list`; a viewer without a tenant sees all.
    let shared = c.root.path().join("shared-image");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("file"), "shared\n").unwrap();
    let client_a = client(keys::load(&c.nodes[1].dir.join("admin.key")).unwrap()).await;
    client_a
        .call(
            &to,
            ImageImport {
                name: "shared".into(),
                path: shared.display().to_string(),
                tenant: None,
                pin: false,
            },
        )
        .await
        .unwrap();
    for (name, tenant) in [("a1", "acme"), ("g1", "globex")] {
        let _ = admin_node.try_cli(&["tenant", "create", tenant]);
        client_a
            .call(
                &to,
                blixard_net::api::VmCreate {
                    spec: vm_spec(name, tenant, "shared"),
                    start: false,
                },
            )
            .await
            .unwrap();
    }
    client_a.endpoint().close().await;
    let all_viewer = SecretKey::generate();
    add_user(admin_node, "val", &all_viewer, "viewer", None);
    let vms = |key: SecretKey| {
        let to = to.clone();
        async move {
            let client = client(key).await;
            let list = blixard_net::api::VmList {
                tenant: None,
                node: None,
                stale: false,
            };
            let vms = client.call(&to, list).await.unwrap().vms;
            client.endpoint().close().await;
            let mut names: Vec<String> = vms.into_iter().map(|v| v.id()).collect();
            names.sort();
            names
        }
    };
    assert_eq!(vms(operator.clone()).await, ["acme/a1"]);
    assert_eq!(vms(viewer.clone()).await, ["acme/a1"]);
    assert_eq!(vms(other_operator.clone()).await, ["globex/g1"]);
    assert_eq!(vms(all_viewer).await, ["acme/a1", "globex/g1"]);
    // And another tenant's VM reads as missing-or-forbidden, never its contents.
    let client_o = client(operator.clone()).await;
    let show = blixard_net::api::VmShow {
        vm: blixard_net::api::VmRef {
            name: "g1".into(),
            tenant: Some("globex".into()),
        },
        stale: false,
    };
    let err = client_o.call(&to, show).await.unwrap_err().to_string();
    assert!(err.contains("vm:read on VM globex/g1"), "{err}");
    client_o.endpoint().close().await;

    // The blob protocol (iroh-blobs) passes the same choke point: strangers and users
    // cannot fetch blobs.
    let manifest =
        iroh_blobs::HashAndFormat::hash_seq(iroh_blobs::Hash::from_bytes(image.manifest.0));
    let fetch = |key: SecretKey| {
        let to = to.clone();
        async move {
            let ep = endpoint::bind(key, "127.0.0.1:0".parse().unwrap(), None, vec![])
                .await
                .unwrap();
            let store = iroh_blobs::store::mem::MemStore::new();
            let result = match ep.connect(to, iroh_blobs::ALPN).await {
                Ok(conn) => store.remote().fetch(conn, manifest).await.is_ok(),
                Err(_) => false,
            };
            ep.close().await;
            result
        }
    };
    assert!(
        !fetch(SecretKey::generate()).await,
        "a stranger fetched blobs"
    );
    assert!(
        !fetch(admin.clone()).await,
        "users fetch through the API, not blobs"
    );
    // (Members fetching through the gate is what every pull in tests/images.rs does.)

    // Rotating a user's key in place: the old key is refused, the new one works.
    let rotated = SecretKey::generate();
    admin_node.cli_ok(&["user", "set-key", "vera", "--key", &key_hex(&rotated)]);
    let status = || Request::from(StatusRequest { stale: false });
    let old = client(viewer.clone()).await;
    let new = client(rotated.clone()).await;
    wait_for_allowed(&new, &to, status).await;
    assert!(
        !allowed(&old, &to, status()).await,
        "the old key still works"
    );
    old.endpoint().close().await;
    new.endpoint().close().await;

    // Rotating a node's admin credential: the CLI keeps working with the new file, and
    // the old key is refused.
    let before = keys::load(&admin_node.dir.join("admin.key")).unwrap();
    admin_node.cli_ok(&["cluster", "rotate-admin-key"]);
    let after = keys::load(&admin_node.dir.join("admin.key")).unwrap();
    assert_ne!(before.public(), after.public());
    assert!(!admin_node.dir.join("admin.key.new").exists());
    let old = client(before).await;
    assert!(
        !allowed(&old, &to, status()).await,
        "the old admin key still works"
    );
    old.endpoint().close().await;
    admin_node.cli_ok(&["cluster", "meta", "set", "rotated", "yes"]);
}

/// Waits until `client` is let through (the change may still be applying on `to`).
async fn wait_for_allowed(client: &ApiClient, to: &EndpointAddr, request: impl Fn() -> Request) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !allowed(client, to, request()).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the new key was never accepted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn an_invalid_policy_is_refused_and_the_old_one_stays() {
    let c = Cluster::start(1, &[]);
    let n = &c.nodes[0];
    let dir = c.root.path();
    let viewer = SecretKey::generate();
    add_user(n, "vera", &viewer, "viewer", None);

    // Viewers may read by default.
    let out = n.cli_ok(&[
        "policy",
        "test",
        "--principal",
        "user:vera",
        "--action",
        "cluster:read",
    ]);
    assert!(out.starts_with("ALLOW"), "{out}");

    // A policy naming an action that does not exist: refused, defaults stay.
    let bad = dir.join("bad.cedar");
    std::fs::write(
        &bad,
        "permit(principal, action == Blixard::Action::\"vm:fly\", resource);",
    )
    .unwrap();
    let out = n.cli(&["policy", "set", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("do not match the schema"), "{err}");
    let shown = n.cli_ok(&["policy", "show", "--output", "json"]);
    assert!(shown.contains("\"default\": true"), "{shown}");

    // A valid replacement that only lets admins in takes effect cluster-wide.
    let strict = dir.join("strict.cedar");
    std::fs::write(
        &strict,
        "@id(\"admins-only\")\npermit(principal is Blixard::User, action, resource) when { principal.roles.contains(\"admin\") };\n",
    )
    .unwrap();
    n.cli_ok(&["policy", "set", strict.to_str().unwrap()]);
    let out = n.cli_ok(&[
        "policy",
        "test",
        "--principal",
        "user:vera",
        "--action",
        "cluster:read",
    ]);
    assert!(out.starts_with("DENY"), "{out}");
    let vera_key = dir.join("vera.key");
    std::fs::write(&vera_key, format!("{}\n", EndpointKey(viewer.to_bytes()))).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&vera_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = n.cli(&[
        "--credential",
        vera_key.to_str().unwrap(),
        "cluster",
        "status",
    ]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The cluster keeps working for admins.
    n.cli_ok(&["cluster", "meta", "set", "still", "working"]);

    // Every decision on a mutating request is in the audit log, allowed or denied.
    let out = n.cli(&[
        "--credential",
        vera_key.to_str().unwrap(),
        "cluster",
        "meta",
        "set",
        "x",
        "y",
    ]);
    assert_eq!(out.status.code(), Some(4));
    // The daemon writes the log in the background: wait for the last decision to be in it.
    let lines = wait_for(
        "vera's denial in the audit log",
        Duration::from_secs(10),
        || {
            let audit = n.cli_ok(&["audit", "tail", "-n", "50"]);
            let lines: Vec<serde_json::Value> = audit
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if lines
                .iter()
                .any(|l| l["principal"] == "user vera" && l["allowed"] == false)
            {
                Ok(lines)
            } else {
                Err(audit)
            }
        },
    );
    assert!(lines
        .iter()
        .any(|l| l["request"] == "PolicySet" && l["allowed"] == true && l["outcome"] == "ok"));
    assert!(lines.iter().any(|l| l["request"] == "PolicySet"
        && l["outcome"].as_str().is_some_and(|o| o.contains("schema"))));
}

#[test]
fn whoami_creates_a_user_key_once() {
    let home = tempfile::tempdir().unwrap();
    let run = || {
        std::process::Command::new(blixard_tests::binary())
            .args(["--data-dir", "/nonexistent", "whoami"])
            .env("HOME", home.path())
            .output()
            .unwrap()
    };
    let first = run();
    assert!(first.status.success());
    let second = run();
    assert_eq!(first.stdout, second.stdout, "the same key on every call");
    let id = String::from_utf8_lossy(&first.stdout).trim().to_string();
    assert!(id.parse::<EndpointKey>().is_ok(), "{id}");
    let key = home.path().join(".config/blixard/key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// `DATA_DIR/audit.log` as a named pipe, read in a thread of its own as a slow log shipper
/// would: not before [`PipeReader::start`], then at most `rate` bytes a second. This is
/// the throttle on the audit writer: while the pipe is full, its `write` blocks in the
/// kernel, exactly as on a disk that cannot keep up.
struct PipeReader {
    lines: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    start: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PipeReader {
    fn new(path: &std::path::Path, rate: u64) -> Self {
        use std::io::Read;
        let made = std::process::Command::new("mkfifo")
            .args(["-m", "600"])
            .arg(path)
            .status()
            .unwrap();
        assert!(made.success(), "mkfifo {}", path.display());
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let bytes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (start, started) = std::sync::mpsc::channel::<()>();
        let path = path.to_owned();
        let (lines_w, bytes_w) = (lines.clone(), bytes.clone());
        let thread = std::thread::spawn(move || {
            // Opened once the node's audit writer opens it for writing.
            let mut pipe = std::fs::File::open(&path).unwrap();
            let _ = started.recv();
            let since = std::time::Instant::now();
            let (mut buf, mut partial, mut total) = (vec![0u8; 4096], Vec::new(), 0u64);
            loop {
                let n = pipe.read(&mut buf).unwrap();
                if n == 0 {
                    return; // the node exited
                }
                total += n as u64;
                bytes_w.store(total, std::sync::atomic::Ordering::Relaxed);
                partial.extend_from_slice(&buf[..n]);
                while let Some(end) = partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=end).collect();
                    let v = serde_json::from_slice(&line).unwrap();
                    lines_w.lock().unwrap().push(v);
                }
                // The throttle itself: no faster than `rate` bytes a second.
                let due = Duration::from_secs_f64(total as f64 / rate as f64);
                if let Some(ahead) = due.checked_sub(since.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
        });
        Self {
            lines,
            bytes,
            start: Some(start),
            thread: Some(thread),
        }
    }

    /// Starts reading.
    fn start(&mut self) {
        self.start.take();
    }

    /// Waits until `n` lines read so far match `matches`; returns every line read so far.
    fn wait_for(
        &self,
        what: &str,
        n: usize,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        wait_for(what, Duration::from_secs(120), || {
            let lines = self.lines.lock().unwrap().clone();
            let got = lines.iter().filter(|l| matches(l)).count();
            if got >= n {
                Ok(lines)
            } else {
                Err(format!("{got} of {n}"))
            }
        })
    }

    /// Every line, once the node has exited (the pipe's end).
    fn finish(mut self) -> Vec<serde_json::Value> {
        self.start();
        self.thread.take().unwrap().join().unwrap();
        self.lines.lock().unwrap().clone()
    }
}

/// One node (`--init`) with `config` as its config file and its audit log a named pipe
/// read at `rate` bytes a second (paused until [`PipeReader::start`]).
async fn node_with_piped_audit(config: &str, rate: u64) -> (tempfile::TempDir, Node, PipeReader) {
    let root = tempfile::Builder::new()
        .prefix("blixard-test")
        .tempdir()
        .unwrap();
    let file = root.path().join("n1.toml");
    std::fs::write(&file, config).unwrap();
    let mut n = Node::new(root.path(), "n1");
    std::fs::create_dir(&n.dir).unwrap();
    std::fs::set_permissions(&n.dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let reader = PipeReader::new(&n.dir.join("audit.log"), rate);
    let n = tokio::task::spawn_blocking(move || {
        n.start(&["--init", "--config", file.to_str().unwrap()]);
        n
    })
    .await
    .unwrap();
    (root, n, reader)
}

/// Sends every `(client, request)`, `at_once` at a time; the answers, in the same order.
async fn burst(
    clients: std::sync::Arc<Vec<ApiClient>>,
    to: &EndpointAddr,
    requests: Vec<(usize, Request)>,
    at_once: usize,
) -> Vec<Result<(), ApiError>> {
    let requests = std::sync::Arc::new(requests);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..at_once {
        let (requests, next, clients, to) =
            (requests.clone(), next.clone(), clients.clone(), to.clone());
        tasks.spawn(async move {
            let mut answers = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((who, request)) = requests.get(i) else {
                    return answers;
                };
                let frame = RequestFrame::new(None, request.clone());
                let answer = match clients[*who].call_frame(&to, frame).await {
                    Ok(r) => r.map(|_| ()),
                    Err(e) => panic!("request {i}: {e}"),
                };
                answers.push((i, answer));
            }
        });
    }
    let mut all: Vec<(usize, Result<(), ApiError>)> = Vec::new();
    while let Some(answers) = tasks.join_next().await {
        all.extend(answers.unwrap());
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, a)| a).collect()
}

/// The audit log reader's rate in the burst test: 1 MiB/s.
const SLOW_READER: u64 = 1 << 20;

/// A burst of 10,000 requests against a node whose audit log cannot keep up loses no
/// record.
///
/// The throttle: `audit.log` is a named pipe that the test reads at 1 MiB/s, and the node
/// runs with `[audit] queue = 16` (`on_full` is the default, `block`). The burst makes
/// about 5 MB of lines (12,000 of them), so the writer spends most of the burst blocked
/// in `write`, and callers wait for room. That they did is checked twice: the burst
/// cannot end sooner than the reader lets the lines through (all but what the pipe, the
/// writer's buffer and the queues hold), and the daemon's log says that records waited
/// for room.
///
/// The requests: 9,000 from a stranger's key, all denied, half of them reads (`vm show`)
/// and half mutations (`vm delete`), each naming a VM of its own so each denial is one
/// line to find; and 1,000 `meta set` with the admin credential, each a decision, an
/// outcome and an applied change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_against_a_slow_audit_log_loses_no_record() {
    use blixard_net::api::{VmDelete, VmRef, VmShow};
    let (_root, mut n, mut reader) =
        node_with_piped_audit("[audit]\nqueue = 16\n", SLOW_READER).await;
    reader.start();
    let to = addr_of(&n);
    let admin_key = keys::load(&n.dir.join("admin.key")).unwrap();
    let stranger_key = SecretKey::generate();
    let (admin_hex, stranger_hex) = (key_hex(&admin_key), key_hex(&stranger_key));
    let clients = std::sync::Arc::new(vec![client(admin_key).await, client(stranger_key).await]);
    let vm = |i: usize| VmRef {
        name: format!("s{i}"),
        tenant: None,
    };
    let requests: Vec<(usize, Request)> = (0..10_000)
        .map(|i| match i {
            i if i % 10 == 0 => (
                0,
                MetaSet {
                    key: format!("burst-{i}"),
                    value: Some("1".into()),
                }
                .into(),
            ),
            i if i % 2 == 1 => (
                1,
                VmShow {
                    vm: vm(i),
                    stale: true,
                }
                .into(),
            ),
            i => (1, VmDelete { vm: vm(i) }.into()),
        })
        .collect();
    let kinds: Vec<&str> = requests.iter().map(|(_, r)| r.kind()).collect();
    let started = std::time::Instant::now();
    let answers = burst(clients, &to, requests, 64).await;
    let took = started.elapsed();
    for (i, a) in answers.iter().enumerate() {
        match (i % 10 == 0, a) {
            (true, Ok(())) | (false, Err(ApiError::Unauthorized { .. })) => {}
            _ => panic!("request {i} ({}): {a:?}", kinds[i]),
        }
    }

    // Every denial: one line each, naming its own VM.
    let lines = reader.wait_for("9,000 denials in the audit log", 9_000, |l| {
        l["key"] == stranger_hex.as_str()
    });
    let mut denied: BTreeMap<usize, usize> = BTreeMap::new();
    for l in lines.iter().filter(|l| l["key"] == stranger_hex.as_str()) {
        assert_eq!(l["allowed"], false, "{l}");
        let resource = l["decision"]["resource"].as_str().unwrap();
        let i: usize = resource.rsplit_once("/s").unwrap().1.parse().unwrap();
        assert_eq!(l["request"], kinds[i], "{l}");
        *denied.entry(i).or_default() += 1;
    }
    assert_eq!(denied.len(), 9_000, "denials recorded");
    assert!(denied.values().all(|n| *n == 1), "a denial recorded twice");
    // Every mutation: its decision, its outcome, and the change it applied.
    let lines = reader.wait_for("1,000 applied changes in the audit log", 1_000, |l| {
        l["change"] == "set_meta"
    });
    let admin_sets = |outcome: serde_json::Value| {
        lines
            .iter()
            .filter(|l| {
                l["key"] == admin_hex.as_str()
                    && l["request"] == "MetaSet"
                    && l["allowed"] == true
                    && l["outcome"] == outcome
            })
            .count()
    };
    assert_eq!(admin_sets(serde_json::Value::Null), 1_000, "decisions");
    assert_eq!(admin_sets("ok".into()), 1_000, "outcomes");
    let mut indexes: Vec<u64> = lines
        .iter()
        .filter(|l| l["change"] == "set_meta")
        .map(|l| l["index"].as_u64().unwrap())
        .collect();
    indexes.sort();
    indexes.dedup();
    assert_eq!(indexes.len(), 1_000, "applied changes");

    // The writer really was held up: the answers could not all be sent sooner than the
    // reader let their lines through, less what the pipe (64 KiB), the writer's buffer
    // (64 KiB) and the queues (16 lines of requests' records, 1,024 of the node's own)
    // may hold: 1 MiB is ample.
    let bytes = reader.bytes.load(std::sync::atomic::Ordering::Relaxed);
    let floor = Duration::from_secs_f64(bytes.saturating_sub(1 << 20) as f64 / SLOW_READER as f64);
    println!(
        "10,000 requests answered in {took:?} (the reader's floor: {floor:?}); {} audit lines, {bytes} bytes",
        lines.len()
    );
    assert!(
        took >= floor,
        "the burst took {took:?}, less than {floor:?}"
    );
    assert!(n.log().contains("records waited for room"), "{}", n.log());
    // A clean stop still writes its last lines into the pipe.
    assert_eq!(n.stop(), 0, "{}", n.log());
    let all = reader.finish();
    assert!(all.len() >= lines.len());
}

/// With `[audit] on_full = "fail"`, a mutation that finds the audit log behind is refused
/// at once with the documented error (`not run: the audit log is behind ([audit] on_full
/// = "fail"); try again`, exit code 6 from the CLI) and does not run; a denied request is
/// still answered at once; reads go on; and every refusal is in the log once it catches
/// up. The log is held up for real: its named pipe is not read until the end, so once the
/// pipe and the writer's buffer are full, the writer's `write` blocks and the queue (2
/// lines) stays full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_audit_log_set_to_fail_refuses_and_records_the_refusal() {
    const BEHIND: &str = "not run: the audit log is behind ([audit] on_full = \"fail\"); try again";
    let (_root, mut n, mut reader) =
        node_with_piped_audit("[audit]\non_full = \"fail\"\nqueue = 2\n", u64::MAX).await;
    let to = addr_of(&n);
    let admin_key = keys::load(&n.dir.join("admin.key")).unwrap();
    let admin_hex = key_hex(&admin_key);
    let stranger_key = SecretKey::generate();
    let stranger_hex = key_hex(&stranger_key);
    let admin = client(admin_key).await;
    let stranger = client(stranger_key).await;
    let set = |key: String| {
        RequestFrame::new(
            None,
            MetaSet {
                key,
                value: Some("1".into()),
            }
            .into(),
        )
    };

    // Mutations until five in a row are refused: the pipe (64 KiB) and the writer's
    // buffer (64 KiB) are full, a few hundred lines in. (One may be refused before, while
    // the writer is merely behind; those are refusals like the others.)
    let mut ran: Vec<String> = Vec::new();
    let mut refused: Vec<String> = Vec::new();
    let mut in_a_row = 0;
    for i in 0..5_000 {
        let key = format!("fail-{i}");
        match admin.call_frame(&to, set(key.clone())).await.unwrap() {
            Ok(_) => {
                ran.push(key);
                in_a_row = 0;
            }
            Err(ApiError::Unavailable(m)) if m == BEHIND => {
                refused.push(key);
                in_a_row += 1;
                if in_a_row == 5 {
                    break;
                }
            }
            Err(e) => panic!("meta set {key}: {e}"),
        }
    }
    assert_eq!(in_a_row, 5, "{} ran, {} refused", ran.len(), refused.len());
    println!(
        "{} mutations ran, then the audit log was full ({} refused)",
        ran.len(),
        refused.len()
    );
    // The same through the CLI: exit code 6 and one line saying why.
    wait_for("the CLI to be refused", Duration::from_secs(30), || {
        let key = format!("cli-{}", ran.len() + refused.len());
        let out = n.cli(&["cluster", "meta", "set", &key, "1"]);
        if out.status.success() {
            ran.push(key);
            return Err("it ran".into());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(6), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(BEHIND), "{stderr}");
        refused.push(key);
        Ok(())
    });
    // A denial is answered at once, and reads go on.
    let frame = RequestFrame::new(
        None,
        MetaSet {
            key: "stranger".into(),
            value: Some("1".into()),
        }
        .into(),
    );
    let denied = stranger.call_frame(&to, frame).await.unwrap();
    assert!(
        matches!(denied, Err(ApiError::Unauthorized { .. })),
        "{denied:?}"
    );
    n.cli_ok(&["cluster", "meta", "get", "--output", "json"]);

    // Once the log is read, every refusal is in it, with the decisions, outcomes and
    // changes of the requests that ran.
    reader.start();
    let not_run = "not run: the audit log is behind ([audit] on_full = \"fail\")";
    reader.wait_for("every refusal in the audit log", refused.len(), |l| {
        l["outcome"] == not_run
    });
    reader.wait_for("the stranger's denial in the audit log", 1, |l| {
        l["key"] == stranger_hex.as_str() && l["allowed"] == false
    });
    let lines = reader.wait_for("every applied change in the audit log", ran.len(), |l| {
        l["change"] == "set_meta"
    });
    let count = |outcome: serde_json::Value| {
        lines
            .iter()
            .filter(|l| l["key"] == admin_hex.as_str() && l["request"] == "MetaSet")
            .filter(|l| l["outcome"] == outcome)
            .count()
    };
    assert_eq!(count(not_run.into()), refused.len(), "refusals, each once");
    assert_eq!(
        count(serde_json::Value::Null),
        ran.len(),
        "decisions of those that ran"
    );
    assert_eq!(count("ok".into()), ran.len(), "outcomes");
    let changes = lines.iter().filter(|l| l["change"] == "set_meta").count();
    assert_eq!(changes, ran.len(), "only those that ran changed anything");
    // The refused ones did not run: their keys are not set.
    let meta = n.cli_ok(&["cluster", "meta", "get", "--output", "json"]);
    for key in &ran {
        assert!(
            meta.contains(&format!("\"{key}\"")),
            "{key} missing: {meta}"
        );
    }
    for key in &refused {
        assert!(!meta.contains(&format!("\"{key}\"")), "{key} set: {meta}");
    }
    // Caught up, it takes mutations again.
    n.cli_ok(&["cluster", "meta", "set", "after", "1"]);
    assert_eq!(n.stop(), 0, "{}", n.log());
    reader.finish();
}
