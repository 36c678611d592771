//! The cache over real sockets, against a real blob store: ranges, limits, timeouts, and a
//! body the store cannot finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bao_tree::io::Leaf;
use iroh_blobs::api::proto::ExportRangesItem;
use n0_future::boxed::BoxStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::body::NarSource;
use super::*;
use crate::manifest::CheckedEntry;
use crate::nix::NarHash;
use crate::progress::Progress;

struct NoKey;

impl KeySource for NoKey {
    fn signing_key(&self) -> Option<SigningKey> {
        None
    }
}

/// A blob store holding one image: a directory with one file of `mib` MiB of noise.
async fn store_with_nar(mib: usize) -> (tempfile::TempDir, ImageStore, CheckedEntry) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ mib as u64;
    let bytes: Vec<u8> = (0..mib << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(src.join("disk.img"), bytes).unwrap();
    let store = ImageStore::open(&dir.path().join("blobs"), StoreDir::default())
        .await
        .unwrap();
    let imported = store
        .import(&src, "noise", &Progress::none())
        .await
        .unwrap();
    let entry = imported.manifest.check().unwrap().remove(0);
    (dir, store, entry)
}

fn limits() -> Limits {
    Limits {
        max_connections: 64,
        max_streams: 8,
        header_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(600),
    }
}

/// Serves `store` (its NARs' bytes from `source`, else the store) on an ephemeral port.
async fn start(
    store: &ImageStore,
    limits: Limits,
    source: Option<Arc<dyn NarSource>>,
) -> (SocketAddr, Arc<Cache>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let source = source.unwrap_or_else(|| Arc::new(store.clone()));
    let cache = Arc::new(Cache::new(
        store.clone(),
        StoreDir::default(),
        Arc::new(NoKey),
        limits,
        source,
    ));
    let task = tokio::spawn(conn::accept_loop(listener, cache.clone()));
    (addr, cache, task)
}

/// A response as the client saw it.
#[derive(Debug)]
struct Seen {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    fn length(&self) -> Option<usize> {
        self.header("content-length")?.parse().ok()
    }

    /// Whether the body is as long as the head said.
    fn complete(&self) -> bool {
        self.length() == Some(self.body.len())
    }
}

/// Everything until the server closes (a reset counts as the end too).
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0; 1 << 16];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn parse(bytes: &[u8]) -> Seen {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(bytes)));
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Seen {
        status,
        head,
        body: bytes[end + 4..].to_vec(),
    }
}

/// One request on a new connection that the client asks the server to close after it.
async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> Seen {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: cache\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    parse(&read_to_close(&mut s).await)
}

/// A connection with a small receive buffer that asks for `path` and reads nothing.
async fn stalled(addr: SocketAddr, path: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: cache\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

async fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn nar_path(e: &CheckedEntry) -> String {
    format!("/nar/{}.nar", e.blob.to_hex())
}

/// The cache (and the unpack) read a complete NAR from the blob store's own file of it,
/// where iroh-blobs keeps it (`PathOptions::data_path`). If an iroh-blobs upgrade moves
/// it, this fails rather than every NAR silently taking the slow road.
#[tokio::test]
async fn a_complete_nar_is_read_from_the_blob_stores_own_file() {
    let (_dir, store, e) = store_with_nar(1).await;
    let mut file = store
        .blob_file(&e.blob, e.nar_size)
        .expect("the NAR's blob in a file of its own");
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).unwrap();
    assert_eq!(NarHash::digest(&bytes), e.nar_hash);
    // A file of another length than the manifest says is not taken.
    assert!(store.blob_file(&e.blob, e.nar_size + 1).is_none());
    assert!(store.blob_file(&iroh_blobs::Hash::EMPTY, 0).is_none());
}

/// An import that fails part way through its NAR (here at a fifo, after 2 MiB of a
/// file) is an error naming what failed, and leaves no image behind.
#[tokio::test]
async fn an_import_failing_midway_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a-disk.img"), vec![7u8; 2 << 20]).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(src.join("z-pipe"))
        .status()
        .unwrap();
    assert!(made.success());
    let store = ImageStore::open(&dir.path().join("blobs"), StoreDir::default())
        .await
        .unwrap();
    let err = store
        .import(&src, "broken", &Progress::none())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("z-pipe"), "{err}");
    assert!(store.held().await.unwrap().is_empty());
}

#[tokio::test]
async fn nars_whole_by_head_and_by_range() {
    let (_dir, store, e) = store_with_nar(1).await;
    let (addr, _cache, _task) = start(&store, limits(), None).await;
    let path = nar_path(&e);
    let size = e.nar_size as usize;

    let full = request(addr, "GET", &path, &[]).await;
    assert_eq!(full.status, 200);
    assert!(full.complete(), "{}", full.head);
    assert_eq!(NarHash::digest(&full.body), e.nar_hash);
    assert_eq!(full.header("accept-ranges").as_deref(), Some("bytes"));
    let etag = full.header("etag").unwrap();

    let head = request(addr, "HEAD", &path, &["Range: bytes=0-9"]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.length(), Some(size));
    assert!(head.body.is_empty());

    let info = request(
        addr,
        "GET",
        &format!("/{}.narinfo", e.path.hash_part()),
        &[],
    )
    .await;
    assert_eq!(info.status, 200);
    assert!(String::from_utf8_lossy(&info.body).contains(&format!("NarSize: {size}")));

    for (range, want) in [
        ("bytes=0-0", 0..1),
        ("bytes=100-4195", 100..4196),
        ("bytes=1000-", 1000..size),
        ("bytes=-777", size - 777..size),
        ("bytes=5-99999999", 5..size),
    ] {
        let part = request(addr, "GET", &path, &[&format!("Range: {range}")]).await;
        assert_eq!(part.status, 206, "{range}: {}", part.head);
        assert!(part.complete(), "{range}");
        assert!(part.body == full.body[want.clone()], "{range}: other bytes");
        assert_eq!(
            part.header("content-range").unwrap(),
            format!("bytes {}-{}/{size}", want.start, want.end - 1)
        );
    }
    for range in ["bytes=99999999-", "bytes=9-3", "bytes=-0"] {
        let bad = request(addr, "GET", &path, &[&format!("Range: {range}")]).await;
        assert_eq!(bad.status, 416, "{range}");
        assert_eq!(
            bad.header("content-range").unwrap(),
            format!("bytes */{size}")
        );
    }
    // Several ranges, or an If-Range for another version: the whole NAR.
    let multi = request(addr, "GET", &path, &["Range: bytes=0-1,5-6"]).await;
    assert_eq!((multi.status, multi.body.len()), (200, size));
    let other = request(addr, "GET", &path, &["Range: bytes=0-1", "If-Range: \"x\""]).await;
    assert_eq!((other.status, other.body.len()), (200, size));
    let same = request(
        addr,
        "GET",
        &path,
        &["Range: bytes=0-1", &format!("If-Range: {etag}")],
    )
    .await;
    assert_eq!((same.status, same.body.len()), (206, 2));
}

/// Stands in for a store that sends 100 KiB of a NAR, pauses (so they go out), then fails.
struct Failing {
    size: u64,
}

impl NarSource for Failing {
    fn export(
        &self,
        _blob: iroh_blobs::Hash,
        range: std::ops::Range<u64>,
    ) -> BoxStream<ExportRangesItem> {
        use n0_future::StreamExt;
        let mut items = vec![ExportRangesItem::Size(self.size)];
        let mut at = range.start;
        while at < 100 << 10 {
            items.push(ExportRangesItem::Data(Leaf {
                offset: at,
                data: vec![0; 1024].into(),
            }));
            at += 1024;
        }
        let fail = n0_future::stream::once_future(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            ExportRangesItem::Error(iroh_blobs::api::Error::other("disk on fire"))
        });
        Box::pin(n0_future::stream::iter(items).chain(fail))
    }
}

#[tokio::test]
async fn a_body_the_store_cannot_finish_is_cut_short_never_ended() {
    let (_dir, store, e) = store_with_nar(1).await;
    let failing = Arc::new(Failing { size: e.nar_size });
    let (addr, cache, _task) = start(&store, limits(), Some(failing)).await;
    let seen = request(addr, "GET", &nar_path(&e), &[]).await;
    // The head was sent before the store failed; the connection ends before the
    // announced length, so the client knows the body is not whole.
    assert_eq!(seen.status, 200);
    assert_eq!(seen.length(), Some(e.nar_size as usize));
    assert_eq!(seen.body.len(), 100 << 10, "the bytes before the failure");
    assert!(!seen.complete());
    // The stream slot is given back.
    wait_until("the slot back", Duration::from_secs(5), || {
        cache.streams.available_permits() == cache.limits.max_streams
    })
    .await;
}

#[tokio::test]
async fn nar_downloads_beyond_max_streams_are_refused_with_503() {
    let (_dir, store, e) = store_with_nar(8).await;
    let limits = Limits {
        max_streams: 2,
        ..limits()
    };
    let (addr, cache, _task) = start(&store, limits, None).await;
    let path = nar_path(&e);
    let a = stalled(addr, &path).await;
    let b = stalled(addr, &path).await;
    wait_until("two streams", Duration::from_secs(5), || {
        cache.streams.available_permits() == 0
    })
    .await;
    let third = request(addr, "GET", &path, &[]).await;
    assert_eq!(third.status, 503);
    assert_eq!(third.header("retry-after").as_deref(), Some("1"));
    // A HEAD, a narinfo and the cache info need no stream.
    let head = request(addr, "HEAD", &path, &[]).await;
    assert_eq!(head.status, 200);
    let info = request(addr, "GET", "/nix-cache-info", &[]).await;
    assert_eq!(info.status, 200);
    drop((a, b));
    wait_until("the slots back", Duration::from_secs(5), || {
        cache.streams.available_permits() == 2
    })
    .await;
    let again = request(addr, "GET", &path, &[]).await;
    assert_eq!(again.status, 200);
    assert!(again.complete());
}

#[tokio::test]
async fn connections_beyond_max_connections_are_refused_with_503() {
    let (_dir, store, _e) = store_with_nar(1).await;
    let limits = Limits {
        max_connections: 2,
        max_streams: 2,
        ..limits()
    };
    let (addr, _cache, _task) = start(&store, limits, None).await;
    let _one = TcpStream::connect(addr).await.unwrap();
    let _two = TcpStream::connect(addr).await.unwrap();
    let third = request(addr, "GET", "/nix-cache-info", &[]).await;
    assert_eq!(third.status, 503);
    assert_eq!(third.header("retry-after").as_deref(), Some("1"));
    assert_eq!(third.header("connection").as_deref(), Some("close"));
}

/// How long until the server closes `s` (reading whatever it sends).
async fn closed_after(mut s: TcpStream, from: Instant) -> Duration {
    read_to_close(&mut s).await;
    from.elapsed()
}

#[tokio::test]
async fn silent_half_sent_idle_and_stalled_connections_are_closed() {
    let (_dir, store, e) = store_with_nar(8).await;
    let l = limits();
    let (addr, cache, _task) = start(&store, l.clone(), None).await;
    let slack = Duration::from_millis(500);

    // Silent, and half a head: the header timeout.
    let t0 = Instant::now();
    let silent = TcpStream::connect(addr).await.unwrap();
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: ca")
        .await
        .unwrap();
    let (a, b) = tokio::join!(closed_after(silent, t0), closed_after(half, t0));
    for took in [a, b] {
        assert!(
            took >= l.header_timeout && took < l.header_timeout + slack,
            "{took:?}"
        );
    }

    // Kept alive after a response: the idle timeout, longer than the header timeout.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: cache\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0; 4096];
    let n = kept.read(&mut buf).await.unwrap();
    let answered = Instant::now();
    assert!(parse(&buf[..n]).complete());
    let took = closed_after(kept, answered).await;
    assert!(
        took >= l.idle_timeout && took < l.idle_timeout + slack,
        "{took:?}"
    );

    // A client that stops reading a NAR: closed once nothing moved for the idle timeout;
    // what it got is short of the Content-Length.
    let mut stuck = stalled(addr, &nar_path(&e)).await;
    wait_until("the stream", Duration::from_secs(5), || {
        cache.streams.available_permits() == l.max_streams - 1
    })
    .await;
    let t1 = Instant::now();
    wait_until(
        "the stalled stream closed",
        l.idle_timeout + Duration::from_secs(3),
        || cache.streams.available_permits() == l.max_streams,
    )
    .await;
    assert!(t1.elapsed() < l.idle_timeout + slack);
    let seen = parse(&read_to_close(&mut stuck).await);
    assert_eq!(seen.status, 200);
    assert!(seen.body.len() < e.nar_size as usize, "{}", seen.body.len());
}
