//! Helpers shared by the fuzz targets.

use std::future::Future;
use std::task::{Context, Poll, Waker};

/// Runs a future that never waits (a reader over a byte slice) to its end; `None` if it
/// would wait.
pub fn now<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// The text of an input, for decoders that take a `&str` (invalid UTF-8 never reaches
/// them: their callers read text with `read_to_string` or from HTTP/JSON strings).
pub fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}
