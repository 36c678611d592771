//! Response bodies: a small text, or a NAR (or a range of one) streamed from the blob
//! store. A NAR body is complete or fails: when the store cannot produce its bytes, the
//! body returns an error, hyper closes the connection before the `Content-Length` it
//! announced, and the client sees a short read, never a complete-looking response.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::body::{Body, Frame, SizeHint};
use iroh_blobs::api::proto::ExportRangesItem;
use iroh_blobs::Hash;
use n0_future::boxed::BoxStream;
use tokio::sync::OwnedSemaphorePermit;

/// Where a NAR's bytes come from: the image store, or a stand-in in tests.
pub(crate) trait NarSource: Send + Sync + 'static {
    /// The blob's size, then the bytes of `range` in order (iroh-blobs' `export_ranges`).
    fn export(&self, blob: Hash, range: Range<u64>) -> BoxStream<ExportRangesItem>;

    /// The file holding the complete blob's `size` bytes, when there is one to read
    /// directly (much cheaper than `export`, which hands out 1 KiB at a time).
    fn file(&self, _blob: &Hash, _size: u64) -> Option<std::fs::File> {
        None
    }
}

impl NarSource for crate::store::ImageStore {
    fn export(&self, blob: Hash, range: Range<u64>) -> BoxStream<ExportRangesItem> {
        Box::pin(self.blobs().export_ranges(blob, range).stream())
    }

    fn file(&self, blob: &Hash, size: u64) -> Option<std::fs::File> {
        self.blob_file(blob, size)
    }
}

/// Why a NAR body stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum NarBodyError {
    #[error("NAR {blob}: the blob store failed at byte {offset}: {source}")]
    Read {
        blob: Hash,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("NAR {blob}: the blob store holds {store} bytes, the manifest says {manifest}")]
    Size {
        blob: Hash,
        store: u64,
        manifest: u64,
    },
    #[error("NAR {blob}: the blob store sent byte {got} where byte {want} was next")]
    Order { blob: Hash, got: u64, want: u64 },
}

/// How often a read the store refused as busy is tried again, without any byte coming
/// in between, before the body fails; the waits double from `FIRST_WAIT` (5 ms, …,
/// 640 ms: 1.3 s in all).
const BUSY_RETRIES: u32 = 8;
const FIRST_WAIT: Duration = if cfg!(test) {
    Duration::from_millis(1)
} else {
    Duration::from_millis(5)
};

/// Frames handed to hyper hold up to this much (the store sends 1 KiB pieces).
const FRAME: usize = 64 << 10;

/// Reads of a blob's own file take this much at a time.
const FILE_READ: u64 = 256 << 10;

/// A range of a complete blob's file, read on the blocking pool one read ahead of what
/// hyper is sending.
struct FileRange {
    file: Arc<std::fs::File>,
    /// The read under way: its offset, and its bytes to come.
    reading: Option<(u64, tokio::task::JoinHandle<std::io::Result<Bytes>>)>,
}

/// Reads `at..end` of `file` (up to `FILE_READ` of it) on the blocking pool.
fn read_at(
    file: Arc<std::fs::File>,
    at: u64,
    end: u64,
) -> (u64, tokio::task::JoinHandle<std::io::Result<Bytes>>) {
    let len = (end - at).min(FILE_READ) as usize;
    let read = tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let mut buf = BytesMut::zeroed(len);
        file.read_exact_at(&mut buf, at)?;
        Ok(buf.freeze())
    });
    (at, read)
}

/// A NAR, or a range of one, from the blob store.
pub(crate) struct NarBody {
    source: Arc<dyn NarSource>,
    blob: Hash,
    /// The NAR's size as the manifest says; the store must agree.
    size: u64,
    /// The next byte to send, and the end of the range (exclusive).
    next: u64,
    end: u64,
    /// The store's export of `next..end`, while one runs.
    export: Option<BoxStream<ExportRangesItem>>,
    /// Bytes read, not yet handed to hyper.
    out: BytesMut,
    /// Busy refusals since the last byte came in.
    busy: u32,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A failure to report once the bytes before it are sent.
    error: Option<NarBodyError>,
    /// The NAR stream slot this body holds until it is dropped (complete or not).
    _slot: Option<OwnedSemaphorePermit>,
    /// Counts the bytes handed to hyper (`blixard_cache_sent_bytes_total`).
    sent: Option<prometheus_client::metrics::counter::Counter>,
    /// The blob's own file, read directly instead of through the store's export.
    file: Option<FileRange>,
}

impl NarBody {
    pub(crate) fn new(
        source: Arc<dyn NarSource>,
        blob: Hash,
        size: u64,
        range: Range<u64>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Self {
        Self {
            source,
            blob,
            size,
            next: range.start,
            end: range.end.max(range.start),
            export: None,
            out: BytesMut::new(),
            busy: 0,
            wait: None,
            error: None,
            _slot: slot,
            sent: None,
            file: None,
        }
    }

    /// Reads the bytes from `file`, the blob's own (complete, `size` bytes long).
    pub(crate) fn reading(mut self, file: std::fs::File) -> Self {
        self.file = Some(FileRange {
            file: Arc::new(file),
            reading: None,
        });
        self
    }

    pub(crate) fn counting(mut self, sent: prometheus_client::metrics::counter::Counter) -> Self {
        self.sent = Some(sent);
        self
    }

    /// Sends what was read before the failure, then the failure.
    fn failed(&mut self, e: NarBodyError) -> Poll<Option<Result<Frame<Bytes>, NarBodyError>>> {
        tracing::warn!("binary cache: aborting a response: {e}");
        self.export = None;
        self.wait = None;
        if self.out.is_empty() {
            return Poll::Ready(Some(Err(e)));
        }
        self.error = Some(e);
        self.flush()
    }

    /// Hands what has been read to hyper.
    fn flush(&mut self) -> Poll<Option<Result<Frame<Bytes>, NarBodyError>>> {
        let data = self.out.split().freeze();
        if let Some(sent) = &self.sent {
            sent.inc_by(data.len() as u64);
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    /// The next frame read from the blob's file (`file` is set).
    fn poll_file(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, NarBodyError>>> {
        let (blob, next, end) = (self.blob, self.next, self.end);
        let Some(file) = self.file.as_mut().filter(|_| next < end) else {
            return Poll::Ready(None);
        };
        let handle = file.file.clone();
        let (at, read) = file
            .reading
            .get_or_insert_with(|| read_at(handle, next, end));
        let at = *at;
        let got = ready!(Pin::new(read).poll(cx));
        file.reading = None;
        let data = match got.unwrap_or_else(|join| Err(std::io::Error::other(join.to_string()))) {
            Ok(data) if at == next => data,
            Ok(_) => {
                let e = NarBodyError::Order {
                    blob,
                    got: at,
                    want: next,
                };
                return self.failed(e);
            }
            Err(source) => {
                return self.failed(NarBodyError::Read {
                    blob,
                    offset: at,
                    source,
                })
            }
        };
        self.next += data.len() as u64;
        // Read the next piece while hyper sends this one.
        if self.next < end {
            file.reading = Some(read_at(file.file.clone(), self.next, end));
        }
        if let Some(sent) = &self.sent {
            sent.inc_by(data.len() as u64);
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn poll_nar(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, NarBodyError>>> {
        if let Some(e) = self.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if self.file.is_some() {
            return self.poll_file(cx);
        }
        loop {
            if self.next >= self.end {
                return if self.out.is_empty() {
                    Poll::Ready(None)
                } else {
                    self.flush()
                };
            }
            if self.out.len() >= FRAME {
                return self.flush();
            }
            if let Some(wait) = self.wait.as_mut() {
                ready!(wait.as_mut().poll(cx));
                self.wait = None;
            }
            let (blob, next, end) = (self.blob, self.next, self.end);
            let source = &self.source;
            let export = self
                .export
                .get_or_insert_with(|| source.export(blob, next..end));
            match export.as_mut().poll_next(cx) {
                Poll::Pending if self.out.is_empty() => return Poll::Pending,
                Poll::Pending => return self.flush(),
                Poll::Ready(Some(ExportRangesItem::Size(size))) => {
                    if size != self.size {
                        let e = NarBodyError::Size {
                            blob,
                            store: size,
                            manifest: self.size,
                        };
                        return self.failed(e);
                    }
                }
                Poll::Ready(Some(ExportRangesItem::Data(leaf))) => {
                    if leaf.offset != self.next {
                        let e = NarBodyError::Order {
                            blob,
                            got: leaf.offset,
                            want: self.next,
                        };
                        return self.failed(e);
                    }
                    // The store clips to the blob's end; never send past the range's.
                    let take = (self.end - self.next).min(leaf.data.len() as u64) as usize;
                    self.out.extend_from_slice(&leaf.data[..take]);
                    self.next += take as u64;
                    self.busy = 0;
                }
                Poll::Ready(Some(ExportRangesItem::Error(e))) => {
                    self.export = None;
                    #[allow(unreachable_patterns)]
                    let source = match e {
                        iroh_blobs::api::Error::Io(source) => source,
                        other => std::io::Error::other(other.to_string()),
                    };
                    // The blob's actor queue was full (iroh-blobs answers at once rather
                    // than wait): nothing is wrong with the blob, so ask again shortly.
                    if source.kind() == std::io::ErrorKind::ResourceBusy && self.busy < BUSY_RETRIES
                    {
                        tracing::debug!(blob = %self.blob, offset = self.next, "blob store busy; reading again");
                        self.wait = Some(Box::pin(tokio::time::sleep(
                            FIRST_WAIT * 2u32.pow(self.busy),
                        )));
                        self.busy += 1;
                        if !self.out.is_empty() {
                            return self.flush();
                        }
                        continue;
                    }
                    let e = NarBodyError::Read {
                        blob,
                        offset: self.next,
                        source,
                    };
                    return self.failed(e);
                }
                Poll::Ready(None) => {
                    // The export ends after the last byte asked for; if it ended early
                    // (it says so with an error item first), ask for the rest.
                    self.export = None;
                    if self.next < self.end {
                        let e = NarBodyError::Read {
                            blob,
                            offset: self.next,
                            source: std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the export ended early",
                            ),
                        };
                        return self.failed(e);
                    }
                }
            }
        }
    }
}

/// A response body.
pub(crate) enum CacheBody {
    Full(Full<Bytes>),
    Nar(Box<NarBody>),
}

impl CacheBody {
    pub(crate) fn empty() -> Self {
        Self::Full(Full::new(Bytes::new()))
    }
}

impl Body for CacheBody {
    type Data = Bytes;
    type Error = NarBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, NarBodyError>>> {
        match self.get_mut() {
            CacheBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            CacheBody::Nar(nar) => nar.poll_nar(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            CacheBody::Full(f) => f.is_end_stream(),
            CacheBody::Nar(n) => n.next >= n.end && n.out.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            CacheBody::Full(f) => f.size_hint(),
            CacheBody::Nar(n) => SizeHint::with_exact(n.end - n.next + n.out.len() as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bao_tree::io::Leaf;
    use http_body_util::BodyExt;
    use std::sync::Mutex;

    /// A stand-in store: `data`, exported in 1 KiB pieces, after answering the first
    /// `busy` exports with "busy", and failing for good at byte `fail_at`.
    struct Fake {
        data: Bytes,
        busy: Mutex<u32>,
        fail_at: Option<u64>,
        exports: Mutex<Vec<Range<u64>>>,
    }

    impl Fake {
        fn new(len: usize, busy: u32, fail_at: Option<u64>) -> Arc<Self> {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            Arc::new(Self {
                data: data.into(),
                busy: Mutex::new(busy),
                fail_at,
                exports: Mutex::new(Vec::new()),
            })
        }
    }

    impl NarSource for Fake {
        fn export(&self, _blob: Hash, range: Range<u64>) -> BoxStream<ExportRangesItem> {
            self.exports.lock().unwrap().push(range.clone());
            let size = self.data.len() as u64;
            let mut items = vec![ExportRangesItem::Size(size)];
            let mut busy = self.busy.lock().unwrap();
            if *busy > 0 {
                *busy -= 1;
                items.push(ExportRangesItem::Error(iroh_blobs::api::Error::Io(
                    std::io::ErrorKind::ResourceBusy.into(),
                )));
            } else {
                let mut at = range.start;
                while at < range.end.min(size) {
                    if Some(at) == self.fail_at {
                        items.push(ExportRangesItem::Error(iroh_blobs::api::Error::other(
                            "disk on fire",
                        )));
                        break;
                    }
                    let to = (at + 1024).min(range.end).min(size);
                    items.push(ExportRangesItem::Data(Leaf {
                        offset: at,
                        data: self.data.slice(at as usize..to as usize),
                    }));
                    at = to;
                }
            }
            Box::pin(n0_future::stream::iter(items))
        }
    }

    async fn collect(body: CacheBody) -> Result<Vec<u8>, NarBodyError> {
        body.collect().await.map(|c| c.to_bytes().to_vec())
    }

    fn nar(fake: &Arc<Fake>, range: Range<u64>) -> CacheBody {
        let size = fake.data.len() as u64;
        CacheBody::Nar(Box::new(NarBody::new(
            fake.clone(),
            Hash::EMPTY,
            size,
            range,
            None,
        )))
    }

    #[tokio::test]
    async fn a_busy_store_is_asked_again_and_the_body_is_whole() {
        let fake = Fake::new(300_000, 5, None);
        let body = nar(&fake, 0..300_000);
        assert_eq!(body.size_hint().exact(), Some(300_000));
        assert_eq!(collect(body).await.unwrap(), fake.data.to_vec());
        assert_eq!(fake.exports.lock().unwrap().len(), 6);
    }

    #[tokio::test]
    async fn a_range_is_exactly_its_bytes() {
        let fake = Fake::new(10_000, 1, None);
        let body = nar(&fake, 1000..2500);
        assert_eq!(body.size_hint().exact(), Some(1500));
        assert_eq!(collect(body).await.unwrap(), fake.data[1000..2500].to_vec());
    }

    #[tokio::test]
    async fn a_store_that_stays_busy_fails_the_body() {
        let fake = Fake::new(10_000, BUSY_RETRIES + 1, None);
        let err = collect(nar(&fake, 0..10_000)).await.unwrap_err();
        assert!(matches!(err, NarBodyError::Read { offset: 0, .. }), "{err}");
        assert_eq!(
            fake.exports.lock().unwrap().len(),
            BUSY_RETRIES as usize + 1
        );
    }

    #[tokio::test]
    async fn a_read_error_fails_the_body_after_the_bytes_before_it() {
        let fake = Fake::new(10_000, 0, Some(4096));
        let mut body = nar(&fake, 0..10_000);
        let mut got = Vec::new();
        let err = loop {
            match body.frame().await {
                Some(Ok(f)) => got.extend_from_slice(&f.into_data().unwrap()),
                Some(Err(e)) => break e,
                None => panic!(
                    "the body ended without its last {} bytes",
                    10_000 - got.len()
                ),
            }
        };
        assert_eq!(got, fake.data[..4096].to_vec());
        assert!(err.to_string().contains("disk on fire"), "{err}");
    }

    /// A body read from the blob's own file: the bytes of the range, in frames of
    /// `FILE_READ` at most, and the store never asked.
    #[tokio::test]
    async fn a_range_read_from_the_file_is_exactly_its_bytes() {
        let fake = Fake::new(700_000, 0, None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob.data");
        std::fs::write(&path, &fake.data).unwrap();
        for range in [0..700_000, 1000..2500, 262_144..600_001, 699_999..700_000] {
            let file = std::fs::File::open(&path).unwrap();
            let body =
                NarBody::new(fake.clone(), Hash::EMPTY, 700_000, range.clone(), None).reading(file);
            let mut body = CacheBody::Nar(Box::new(body));
            assert_eq!(body.size_hint().exact(), Some(range.end - range.start));
            let mut got = Vec::new();
            while let Some(frame) = body.frame().await {
                let data = frame.unwrap().into_data().unwrap();
                assert!(data.len() as u64 <= FILE_READ);
                got.extend_from_slice(&data);
            }
            let (a, b) = (range.start as usize, range.end as usize);
            assert_eq!(got, fake.data[a..b].to_vec(), "{range:?}");
        }
        assert!(fake.exports.lock().unwrap().is_empty());
    }

    /// A file cut short under the body fails it after the bytes it had: the client sees
    /// a response short of its `Content-Length`.
    #[tokio::test]
    async fn a_file_cut_short_fails_the_body() {
        let fake = Fake::new(600_000, 0, None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob.data");
        std::fs::write(&path, &fake.data[..300_000]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let body = NarBody::new(fake.clone(), Hash::EMPTY, 600_000, 0..600_000, None).reading(file);
        let mut body = CacheBody::Nar(Box::new(body));
        let mut got = 0u64;
        let err = loop {
            match body.frame().await {
                Some(Ok(f)) => got += f.into_data().unwrap().len() as u64,
                Some(Err(e)) => break e,
                None => panic!("the body ended as if whole after {got} bytes"),
            }
        };
        assert_eq!(got, FILE_READ);
        assert!(
            matches!(err, NarBodyError::Read { offset, .. } if offset == FILE_READ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_store_of_another_size_fails_the_body() {
        let fake = Fake::new(10_000, 0, None);
        let body = CacheBody::Nar(Box::new(NarBody::new(
            fake.clone(),
            Hash::EMPTY,
            12_000,
            0..12_000,
            None,
        )));
        let err = collect(body).await.unwrap_err();
        assert!(
            matches!(
                err,
                NarBodyError::Size {
                    store: 10_000,
                    manifest: 12_000,
                    ..
                }
            ),
            "{err}"
        );
    }
}
