//! The switch that closes every API connection at once, for a stop whose
//! grace period has run out.
//!
//! Owns: the count of open API connections (on the socket and over TCP) and
//! the cut that ends them. Must not: decide when to cut; the daemon does,
//! once its grace period after the stop signal has passed.
//!
//! tonic serves each connection on a task of its own and, on a graceful
//! stop, waits for all of them: a client that keeps a call open and never
//! reads its answer would keep the daemon running. Each accepted stream is
//! wrapped so that, once cut, its next read or write fails (the wrapper also
//! wakes on the cut), which ends hyper's connection and so its task.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

/// The API connections of one daemon; clones share them.
#[derive(Clone, Debug, Default)]
pub struct Connections {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    open: AtomicUsize,
    cut: CancellationToken,
}

impl Connections {
    /// No connection yet, none cut.
    pub fn new() -> Connections {
        Connections::default()
    }

    /// How many connections are open now (TLS handshakes included).
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// Ends every connection, open now or accepted later: its calls fail
    /// on the client's side as a dropped connection.
    pub fn cut(&self) {
        self.inner.cut.cancel();
    }

    /// `io`, counted until it is dropped, and ended by [`Connections::cut`].
    pub(super) fn track<IO>(&self, io: IO) -> Tracked<IO> {
        self.inner.open.fetch_add(1, Ordering::Relaxed);
        Tracked { io, cut: Box::pin(self.inner.cut.clone().cancelled_owned()), inner: Arc::clone(&self.inner) }
    }
}

/// An accepted stream that fails every read and write once cut.
pub(super) struct Tracked<IO> {
    io: IO,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    inner: Arc<Inner>,
}

impl<IO> Tracked<IO> {
    /// Polls the cut, registering the task's waker so that a cut wakes a
    /// connection that waits on a silent client.
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.cut.as_mut().poll(cx).map(|()| io::Error::new(io::ErrorKind::ConnectionAborted, "vipgated is stopping"))
    }
}

impl<IO> Drop for Tracked<IO> {
    fn drop(&mut self) {
        self.inner.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Poll::Ready(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Poll::Ready(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Poll::Ready(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Tracked<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_cut_ends_a_read_that_waits_and_every_later_write_and_the_count_follows_drops() {
        let connections = Connections::new();
        let (server, mut client) = tokio::io::duplex(64);
        let mut tracked = connections.track(server);
        assert_eq!(connections.open(), 1);
        client.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        tracked.read_exact(&mut byte).await.unwrap();
        // The client sends nothing more: only the cut can end this read.
        let waiting = tokio::spawn(async move {
            let read = tracked.read(&mut byte).await;
            (read, tracked)
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        connections.cut();
        let (read, mut tracked) =
            tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.expect("the cut woke it").unwrap();
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(tracked.write(b"y").await.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
        let (later, _peer) = tokio::io::duplex(64);
        let later = connections.track(later);
        assert_eq!(connections.open(), 2);
        drop((tracked, later));
        assert_eq!(connections.open(), 0);
        drop(client);
    }
}
