//! A userspace UDP proxy that delays and drops packets (the kernel here has no netem).
//!
//! In a [`crate::netns::Topology::Proxied`] network each node's packets to another node
//! are DNATed to one port of this proxy per (from, to) pair; the proxy forwards them from
//! a socket of its own to the real node, and the answers back. The kernel's connection
//! tracking makes the answers look, to the sender, as if they came from the node it
//! addressed. Loss is drawn from a seeded generator per link and direction.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;

/// What a link does to the packets it carries (both directions).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Impairment {
    /// One-way delay, plus up to `jitter` either side (uniform).
    pub delay: Duration,
    pub jitter: Duration,
    /// The share of packets dropped, 0.0..=1.0.
    pub loss: f64,
}

/// A small seeded generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// One direction of one link: its impairment, its generator and its counters.
struct Lane {
    impairment: Arc<Mutex<Impairment>>,
    blocked: Arc<std::sync::atomic::AtomicBool>,
    rng: Mutex<Rng>,
    forwarded: AtomicU64,
    dropped: AtomicU64,
}

impl Lane {
    /// Sends `data` through `socket` (to `to`, or its connected peer) after the lane's
    /// delay, unless the lane drops it.
    fn pass(self: &Arc<Self>, socket: &Arc<UdpSocket>, data: Vec<u8>, to: Option<SocketAddr>) {
        let imp = *self.impairment.lock().unwrap();
        let (drop, delay) = {
            let mut rng = self.rng.lock().unwrap();
            let drop = rng.unit() < imp.loss;
            let jitter = imp.jitter.as_micros() as u64;
            let shift = rng.below(2 * jitter + 1) as i64 - jitter as i64;
            let delay = (imp.delay.as_micros() as i64 + shift).max(0) as u64;
            (drop, Duration::from_micros(delay))
        };
        if drop || self.blocked.load(Ordering::Relaxed) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        let socket = socket.clone();
        let send = async move {
            let _ = match to {
                Some(to) => socket.send_to(&data, to).await,
                None => socket.send(&data).await,
            };
        };
        if delay.is_zero() {
            tokio::spawn(send);
        } else {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                send.await;
            });
        }
    }
}

/// One (from, to) pair: node `from`'s packets to node `to`, and the answers.
pub struct Link {
    pub from: usize,
    pub to: usize,
    forward: Arc<Lane>,
    back: Arc<Lane>,
}

/// The proxy: its links and the tasks serving them (aborted when dropped).
pub struct Proxy {
    pub links: Vec<Link>,
    impairment: Arc<Mutex<Impairment>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// Listens on `listen` for each link `(from, to, listen, upstream)` and forwards to
    /// `upstream`, binding its own sockets on `local_ip`. Must run inside the namespace
    /// the sockets belong in (the hub). Every link starts unimpaired.
    pub async fn start(
        local_ip: std::net::IpAddr,
        links: &[(usize, usize, SocketAddr, SocketAddr)],
        seed: u64,
    ) -> Proxy {
        let impairment = Arc::new(Mutex::new(Impairment::default()));
        let mut proxy = Proxy {
            links: Vec::new(),
            impairment: impairment.clone(),
            tasks: Vec::new(),
        };
        for (n, &(from, to, listen, upstream)) in links.iter().enumerate() {
            let lane = |k: u64| {
                Arc::new(Lane {
                    impairment: impairment.clone(),
                    blocked: Arc::new(false.into()),
                    rng: Mutex::new(Rng::new(seed ^ ((n as u64 * 2 + k + 1) * 0x1234_5677))),
                    forwarded: AtomicU64::new(0),
                    dropped: AtomicU64::new(0),
                })
            };
            let (forward, back) = (lane(0), lane(1));
            let socket = Arc::new(
                UdpSocket::bind(listen)
                    .await
                    .unwrap_or_else(|e| panic!("proxy bind {listen}: {e}")),
            );
            proxy.tasks.push(tokio::spawn(serve(
                socket,
                local_ip,
                upstream,
                forward.clone(),
                back.clone(),
            )));
            proxy.links.push(Link {
                from,
                to,
                forward,
                back,
            });
        }
        proxy
    }

    /// Sets every link's latency and loss.
    pub fn impair(&self, imp: Impairment) {
        *self.impairment.lock().unwrap() = imp;
    }

    /// Blocks (or unblocks) the packets node `from` sends to node `to`: the forward
    /// lane of link (from, to) and the answer lane of link (to, from).
    pub fn block(&self, from: usize, to: usize, blocked: bool) {
        for link in &self.links {
            if link.from == from && link.to == to {
                link.forward.blocked.store(blocked, Ordering::Relaxed);
            }
            if link.from == to && link.to == from {
                link.back.blocked.store(blocked, Ordering::Relaxed);
            }
        }
    }

    /// Unblocks every link.
    pub fn unblock_all(&self) {
        for link in &self.links {
            link.forward.blocked.store(false, Ordering::Relaxed);
            link.back.blocked.store(false, Ordering::Relaxed);
        }
    }

    /// Packets forwarded and dropped so far, all links.
    pub fn counts(&self) -> (u64, u64) {
        self.links.iter().fold((0, 0), |(f, d), l| {
            (
                f + l.forward.forwarded.load(Ordering::Relaxed)
                    + l.back.forwarded.load(Ordering::Relaxed),
                d + l.forward.dropped.load(Ordering::Relaxed)
                    + l.back.dropped.load(Ordering::Relaxed),
            )
        })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Serves one link: each source gets an upstream socket of its own, connected to
/// `upstream`, whose answers go back to that source through the listening socket.
async fn serve(
    listen: Arc<UdpSocket>,
    local_ip: std::net::IpAddr,
    upstream: SocketAddr,
    forward: Arc<Lane>,
    back: Arc<Lane>,
) {
    let mut sources: HashMap<SocketAddr, (Arc<UdpSocket>, Aborting)> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, src)) = listen.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let up = match sources.get(&src) {
            Some((up, _)) => up.clone(),
            None => {
                let Ok(up) = UdpSocket::bind(SocketAddr::new(local_ip, 0)).await else {
                    continue;
                };
                if up.connect(upstream).await.is_err() {
                    continue;
                }
                let up = Arc::new(up);
                let answers = tokio::spawn(answer(up.clone(), listen.clone(), src, back.clone()));
                sources.insert(src, (up.clone(), Aborting(answers)));
                up
            }
        };
        forward.pass(&up, buf[..n].to_vec(), None);
    }
}

/// A task aborted when dropped.
struct Aborting(tokio::task::JoinHandle<()>);

impl Drop for Aborting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Carries the upstream node's answers back to `src`.
async fn answer(up: Arc<UdpSocket>, listen: Arc<UdpSocket>, src: SocketAddr, back: Arc<Lane>) {
    let mut buf = vec![0u8; 65536];
    loop {
        match up.recv(&mut buf).await {
            Ok(n) => back.pass(&listen, buf[..n].to_vec(), Some(src)),
            // ICMP unreachable while the node restarts: keep listening.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
