//! Talking to running nodes through the API from the test process (for load and for
//! requests the CLI does not make).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blixard_core::EndpointKey;
use blixard_net::api::{MetaSet, TenantCreate};
use blixard_net::client::ApiClient;
use blixard_net::{endpoint, keys, member_addr, EndpointAddr, SecretKey};

use crate::Node;

/// A running node's id and address, from its `node.json`.
pub fn addr_of(node: &Node) -> (u64, EndpointAddr) {
    let info = node.info().unwrap();
    let id = info["node_id"].as_u64().expect("node_id in node.json");
    let key: EndpointKey = info["endpoint_id"]
        .as_str()
        .expect("endpoint_id in node.json")
        .parse()
        .unwrap();
    let addrs: Vec<SocketAddr> = serde_json::from_value(info["addrs"].clone()).unwrap();
    (id, member_addr(&key, &addrs).expect("a valid endpoint id"))
}

/// A client on a fresh loopback endpoint with the identity in `key_file` (e.g. a node's
/// `admin.key`).
pub async fn client(key_file: &Path, timeout: Duration) -> ApiClient {
    client_on(key_file, SocketAddr::from(([127, 0, 0, 1], 0)), timeout).await
}

/// A client on a fresh endpoint bound to `bind`, with the identity in `key_file`.
pub async fn client_on(key_file: &Path, bind: SocketAddr, timeout: Duration) -> ApiClient {
    client_bound(keys::load(key_file).unwrap(), bind, timeout).await
}

/// A client on a fresh loopback endpoint with identity `secret`.
pub async fn client_as(secret: SecretKey, timeout: Duration) -> ApiClient {
    client_bound(secret, SocketAddr::from(([127, 0, 0, 1], 0)), timeout).await
}

async fn client_bound(secret: SecretKey, bind: SocketAddr, timeout: Duration) -> ApiClient {
    let ep = endpoint::bind(secret, bind, None, vec![]).await.unwrap();
    ApiClient::new(ep, None, timeout)
}

/// One write of a [`Writers`] load and how it went.
#[derive(Debug)]
pub struct Write {
    /// The index (in the targets given) of the node it was sent to.
    pub node: usize,
    /// The key or tenant it created.
    pub name: String,
    pub started: Instant,
    pub ended: Instant,
    pub result: Result<(), String>,
}

/// Concurrent writers, each sending one write at a time to its node and alternating a
/// metadata key and a tenant (which a second application would refuse as "exists"),
/// every one named uniquely.
pub struct Writers {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Write>>>,
}

impl Writers {
    /// Starts `per_node` writers on `rt` for each of `targets`. Names start with `tag`.
    /// A writer stops at its first failure (its node may be gone).
    pub fn start(
        rt: &tokio::runtime::Runtime,
        client: &Arc<ApiClient>,
        targets: &[EndpointAddr],
        per_node: usize,
        tag: &str,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for (node, to) in targets.iter().enumerate() {
            for w in 0..per_node {
                let (client, to) = (client.clone(), to.clone());
                let (stop, done) = (stop.clone(), done.clone());
                let prefix = format!("{tag}{node}-{w}");
                tasks.push(rt.spawn(async move {
                    let mut writes = Vec::new();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let name = format!("{prefix}-{i}");
                        let started = Instant::now();
                        let result = if i % 2 == 0 {
                            let set = MetaSet {
                                key: name.clone(),
                                value: Some("v".into()),
                            };
                            client.call(&to, set).await.map(|_| ())
                        } else {
                            let create = TenantCreate { name: name.clone() };
                            client.call(&to, create).await.map(|_| ())
                        };
                        let result = result.map_err(|e| e.to_string());
                        let failed = result.is_err();
                        writes.push(Write {
                            node,
                            name,
                            started,
                            ended: Instant::now(),
                            result,
                        });
                        done.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                        if failed {
                            break;
                        }
                    }
                    writes
                }));
            }
        }
        Self { stop, done, tasks }
    }

    /// Writes answered so far.
    pub fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `n` more writes than `since` are answered, failing after `within`.
    pub fn wait_done(&self, since: usize, n: usize, within: Duration) {
        crate::wait_for(&format!("{n} writes"), within, || {
            let got = self.done() - since;
            (got >= n).then_some(()).ok_or(format!("{got} writes"))
        });
    }

    /// Stops the writers and returns every write they made.
    pub fn stop(self, rt: &tokio::runtime::Runtime) -> Vec<Write> {
        self.stop.store(true, Ordering::Relaxed);
        rt.block_on(async {
            let mut all = Vec::new();
            for t in self.tasks {
                all.extend(t.await.unwrap());
            }
            all
        })
    }
}

/// The writes in flight at `at` (sent before, answered after) and the time the last of
/// them was answered after it.
pub fn in_flight_at(writes: &[&Write], at: Instant) -> (usize, Duration) {
    let in_flight: Vec<_> = writes
        .iter()
        .filter(|w| w.started < at && w.ended > at)
        .collect();
    let slowest = in_flight
        .iter()
        .map(|w| w.ended - at)
        .max()
        .unwrap_or_default();
    (in_flight.len(), slowest)
}
