//! The binary cache: this node's complete images, served over HTTP in Nix's binary-cache
//! protocol, so `nix copy --from http://…` and `substituters` work against any node.
//!
//! - `GET /nix-cache-info`: the store dir and a priority;
//! - `GET /<hash part>.narinfo`: the store path's narinfo, signed with the cluster key;
//! - `GET /nar/<blob>.nar`: the NAR, uncompressed, streamed from the blob store; one range
//!   (`Range: bytes=…`) gives `206 Partial Content`, which is how Nix resumes a download
//!   that was cut.
//!
//! Only GET and HEAD are served; anything else is 405. The cache is read-only.
//!
//! Limits ([`Limits`]): at most `max_connections` connections and `max_streams` NAR
//! bodies at once; beyond either, `503 Service Unavailable` with `Retry-After`. Timeouts
//! (`conn`): a request head must arrive within `header_timeout`, and a connection on
//! which nothing moves while the server waits on the client (for its next request, or
//! for it to read the response) is closed after `idle_timeout`. A response is complete
//! or visibly failed: a NAR body the store cannot produce in full ends the connection
//! before its `Content-Length` (`body`).

mod body;
mod conn;
mod metrics;
/// Public for the fuzz targets: the `Range` header is read from any HTTP client.
#[doc(hidden)]
pub mod range;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use metrics::CacheMetrics;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::nix::{NarInfo, SigningKey, StoreDir};
use crate::store::ImageStore;
pub use body::NarBodyError;
use body::{CacheBody, NarBody, NarSource};
use conn::Refusals;

/// Where the signing key comes from (it lives in cluster state and may appear later).
pub trait KeySource: Send + Sync + 'static {
    fn signing_key(&self) -> Option<SigningKey>;
}

/// How much the cache takes on at once, and how long it waits for a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open connections; more are answered 503 and closed.
    pub max_connections: usize,
    /// NAR bodies being sent; more NAR requests are answered 503.
    pub max_streams: usize,
    /// From a connection's start, or the first byte of a request, to the end of the head.
    pub header_timeout: Duration,
    /// Nothing moving while the server waits on the client: for the next request on a
    /// kept-alive connection, or for the client to read more of a response.
    pub idle_timeout: Duration,
}

impl Limits {
    pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
    /// iroh-blobs' file store queues at most 32 requests per blob (then answers "busy");
    /// a NAR body sends one request, so 32 bodies of one blob fit even when they all start
    /// at once (beyond, a body turned away asks again: see `body`).
    pub const DEFAULT_MAX_STREAMS: usize = 32;
    pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            max_streams: Self::DEFAULT_MAX_STREAMS,
            header_timeout: Self::DEFAULT_HEADER_TIMEOUT,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// The cache server's shared state.
struct Cache {
    store: ImageStore,
    /// The store dir the cache advertises; only paths of that store dir are served.
    store_dir: StoreDir,
    keys: Arc<dyn KeySource>,
    /// The NARs' bytes (the store's blobs, or a stand-in in tests).
    source: Arc<dyn NarSource>,
    limits: Limits,
    /// One permit per NAR body being sent.
    streams: Arc<Semaphore>,
    refused_connections: Refusals,
    refused_streams: Refusals,
    metrics: CacheMetrics,
}

/// Binds `addr` and serves until the returned task is aborted (which also closes every
/// connection). Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    store: ImageStore,
    store_dir: StoreDir,
    keys: Arc<dyn KeySource>,
    limits: Limits,
    metrics: CacheMetrics,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let source = Arc::new(store.clone());
    let cache = Arc::new(Cache::new(store, store_dir, keys, limits, source).counting(metrics));
    Ok((local, tokio::spawn(conn::accept_loop(listener, cache))))
}

impl Cache {
    fn new(
        store: ImageStore,
        store_dir: StoreDir,
        keys: Arc<dyn KeySource>,
        limits: Limits,
        source: Arc<dyn NarSource>,
    ) -> Self {
        Self {
            store,
            store_dir,
            keys,
            source,
            streams: Arc::new(Semaphore::new(limits.max_streams)),
            refused_connections: Refusals::new(
                "connections",
                "cache_max_connections",
                limits.max_connections,
            ),
            refused_streams: Refusals::new(
                "NAR downloads",
                "cache_max_streams",
                limits.max_streams,
            ),
            limits,
            metrics: CacheMetrics::default(),
        }
    }

    fn counting(mut self, metrics: CacheMetrics) -> Self {
        self.metrics = metrics;
        self
    }
}

type Reply = Response<CacheBody>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(CacheBody::Full(Full::new(body.into())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn retry_after(r: &mut Reply) {
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(conn::RETRY_AFTER_SECS),
    );
}

impl Cache {
    fn answer(&self, req: &Request<Incoming>, peer: SocketAddr) -> Reply {
        let head = req.method() == Method::HEAD;
        let reply = if req.method() != Method::GET && !head {
            text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n")
        } else {
            let mut reply = self.route(req, head);
            if head {
                // hyper sends no body for HEAD, and keeps the Content-Length set here.
                if let Some(len) = hyper::body::Body::size_hint(reply.body()).exact() {
                    reply
                        .headers_mut()
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                }
                *reply.body_mut() = CacheBody::empty();
            }
            reply
        };
        tracing::debug!(
            %peer,
            method = %req.method(),
            path = req.uri().path(),
            status = reply.status().as_u16(),
            "binary cache request"
        );
        self.metrics
            .request(metrics::kind_of(req.uri().path()), reply.status().as_u16());
        reply
    }

    fn route(&self, req: &Request<Incoming>, head: bool) -> Reply {
        let path = req.uri().path();
        if path == "/nix-cache-info" {
            return text(
                StatusCode::OK,
                format!(
                    "StoreDir: {}\nWantMassQuery: 1\nPriority: 30\n",
                    self.store_dir
                ),
            );
        }
        if let Some(hash_part) = path
            .strip_prefix('/')
            .and_then(|p| p.strip_suffix(".narinfo"))
        {
            return self.narinfo(hash_part);
        }
        if let Some(blob) = path
            .strip_prefix("/nar/")
            .and_then(|p| p.strip_suffix(".nar"))
        {
            return self.nar(blob, req, head);
        }
        text(StatusCode::NOT_FOUND, "not found\n")
    }

    fn narinfo(&self, hash_part: &str) -> Reply {
        let Some(cached) = self
            .store
            .cached(hash_part)
            .filter(|c| c.store_dir == self.store_dir)
        else {
            return text(StatusCode::NOT_FOUND, "no such path\n");
        };
        let e = cached.entry;
        let mut info = NarInfo {
            store_path: e.path.clone(),
            url: format!("nar/{}.nar", e.blob.to_hex()),
            compression: "none".into(),
            nar_hash: e.nar_hash,
            nar_size: e.nar_size,
            references: e.references.clone(),
            deriver: e.deriver.clone(),
            signatures: Vec::new(),
        };
        if let Some(key) = self.keys.signing_key() {
            info.sign(&key, &self.store_dir);
        }
        let mut r = text(StatusCode::OK, info.render(&self.store_dir));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/x-nix-narinfo"),
        );
        r
    }

    fn nar(&self, blob: &str, req: &Request<Incoming>, head: bool) -> Reply {
        let Ok(hash) = blob.parse::<iroh_blobs::Hash>() else {
            return text(StatusCode::NOT_FOUND, "no such NAR\n");
        };
        // Only NARs of images this node serves; never arbitrary blobs.
        let Some(cached) = self
            .store
            .cached_by_blob(&hash)
            .filter(|c| c.store_dir == self.store_dir)
        else {
            return text(StatusCode::NOT_FOUND, "no such NAR\n");
        };
        let size = cached.entry.nar_size;
        // A NAR is named by its content, so its blob hash is a strong validator.
        let etag = format!("\"{}\"", hash.to_hex());
        let range = if head {
            range::Wanted::Full
        } else {
            // `If-Range` with another validator asks for the whole NAR.
            let if_range_ok = req
                .headers()
                .get(header::IF_RANGE)
                .is_none_or(|v| v.as_bytes() == etag.as_bytes());
            match req.headers().get(header::RANGE) {
                Some(h) if if_range_ok => range::wanted(Some(h.as_bytes()), size),
                _ => range::Wanted::Full,
            }
        };
        let (status, bytes) = match range {
            range::Wanted::Full => (StatusCode::OK, 0..size),
            range::Wanted::Part(r) => (StatusCode::PARTIAL_CONTENT, r),
            range::Wanted::Unsatisfiable => {
                let mut r = text(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable\n");
                set(&mut r, header::CONTENT_RANGE, format!("bytes */{size}"));
                set(&mut r, header::ACCEPT_RANGES, "bytes".into());
                return r;
            }
        };
        let slot = if head {
            None
        } else {
            match self.streams.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    self.refused_streams.note();
                    let mut r = text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many NAR downloads from this binary cache at once; retry later\n",
                    );
                    retry_after(&mut r);
                    return r;
                }
            }
        };
        let mut body = NarBody::new(self.source.clone(), hash, size, bytes.clone(), slot)
            .counting(self.metrics.sent_bytes.clone());
        if !head {
            if let Some(file) = self.source.file(&hash, size) {
                body = body.reading(file);
            }
        }
        let mut r = Response::new(CacheBody::Nar(Box::new(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-nix-nar"),
        );
        set(&mut r, header::ACCEPT_RANGES, "bytes".into());
        set(&mut r, header::ETAG, etag);
        if status == StatusCode::PARTIAL_CONTENT {
            let last = bytes.end.saturating_sub(1);
            set(
                &mut r,
                header::CONTENT_RANGE,
                format!("bytes {}-{last}/{size}", bytes.start),
            );
        }
        r
    }
}

fn set(r: &mut Reply, name: header::HeaderName, value: String) {
    if let Ok(v) = HeaderValue::try_from(value) {
        r.headers_mut().insert(name, v);
    }
}
