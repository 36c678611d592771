//! The binary cache: this node's complete images, served over HTTP in Nix's binary-cache
//! protocol, so `nix copy --from http://…` and `substituters` work against any node.
//!
//! - `GET /nix-cache-info`: the store dir and a priority;
//! - `GET /<hash part>.narinfo`: the store path's narinfo, signed with the cluster key;
//! - `GET /nar/<blob>.nar`: the NAR, uncompressed, streamed from the blob store.
//!
//! Only GET and HEAD are served; anything else is 405. The cache is read-only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpListener;

use crate::nix::{NarInfo, SigningKey, StoreDir};
use crate::store::ImageStore;

/// Where the signing key comes from (it lives in cluster state and may appear later).
pub trait KeySource: Send + Sync + 'static {
    fn signing_key(&self) -> Option<SigningKey>;
}

/// The cache server's shared state.
struct Cache {
    store: ImageStore,
    /// The store dir the cache advertises; only paths of that store dir are served.
    store_dir: StoreDir,
    keys: Arc<dyn KeySource>,
}

/// Binds `addr` and serves until the returned task is aborted. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    store: ImageStore,
    store_dir: StoreDir,
    keys: Arc<dyn KeySource>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let cache = Arc::new(Cache {
        store,
        store_dir,
        keys,
    });
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("binary cache: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let cache = cache.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let cache = cache.clone();
                    async move { Ok::<_, Infallible>(cache.answer(req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%peer, "binary cache connection: {e}");
                }
            });
        }
    });
    Ok((local, task))
}

type Reply = Response<CacheBody>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(CacheBody::Full(Full::new(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r
}

impl Cache {
    async fn answer(&self, req: Request<Incoming>) -> Reply {
        let head = req.method() == Method::HEAD;
        if req.method() != Method::GET && !head {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        }
        let path = req.uri().path().to_string();
        let mut reply = self.route(&path).await;
        if head {
            *reply.body_mut() = CacheBody::Full(Full::new(Bytes::new()));
        }
        reply
    }

    async fn route(&self, path: &str) -> Reply {
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
            return self.nar(blob).await;
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
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/x-nix-narinfo"),
        );
        r
    }

    async fn nar(&self, blob: &str) -> Reply {
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
        let reader = self.store.blobs().reader(hash);
        let mut r = Response::new(CacheBody::Stream {
            reader: Box::pin(reader),
            left: cached.entry.nar_size,
            buf: vec![0; 256 << 10],
        });
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/x-nix-nar"),
        );
        r
    }
}

/// A response body: a small text, or a NAR streamed from the blob store.
pub enum CacheBody {
    Full(Full<Bytes>),
    Stream {
        reader: Pin<Box<dyn AsyncRead + Send>>,
        left: u64,
        buf: Vec<u8>,
    },
}

impl Body for CacheBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            CacheBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            CacheBody::Stream { reader, left, buf } => {
                if *left == 0 {
                    return Poll::Ready(None);
                }
                let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let mut rb = ReadBuf::new(&mut buf[..want]);
                match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            return Poll::Ready(Some(Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "NAR blob shorter than its manifest says",
                            ))));
                        }
                        *left -= n as u64;
                        Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(&buf[..n])))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            CacheBody::Full(f) => f.is_end_stream(),
            CacheBody::Stream { left, .. } => *left == 0,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            CacheBody::Full(f) => f.size_hint(),
            CacheBody::Stream { left, .. } => hyper::body::SizeHint::with_exact(*left),
        }
    }
}
