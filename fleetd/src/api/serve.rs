//! The API's accept loop: hyper's HTTP/1 server over each listener, with a connection cap
//! and timeouts, so that idle or slow clients cannot exhaust fleetd's file descriptors.
//!
//! `axum::serve` accepts without limit and never times a connection out: about a thousand
//! idle TCP connections used to run fleetd out of descriptors, which also locked out the
//! local Unix socket. Here every listener has its own [`ServeLimits`]:
//!
//! - at most `max_connections` at once: the loop takes a permit *before* `accept(2)`, so
//!   beyond the cap connections wait in the kernel's backlog and cost fleetd no descriptor;
//!   the Unix socket has its own cap, so a full TCP listener never locks out local clients;
//! - `header_read_timeout` (hyper's): a connection must send a complete request head within
//!   it, from the moment hyper waits for one (a fresh connection, or a kept-alive one between
//!   requests), else it is closed;
//! - `idle_timeout`: a connection on which no byte moves in either direction for that long
//!   (a body trickled in, a response never read) is closed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

/// Per-listener bounds on connections. See the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeLimits {
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time a connection has to send a complete request head.
    pub header_read_timeout: Duration,
    /// Time without any byte read or written after which a connection is closed.
    pub idle_timeout: Duration,
}

impl ServeLimits {
    /// The TCP listener's defaults: 256 connections, 10 s for a request head, 60 s idle.
    pub const TCP: ServeLimits = ServeLimits {
        max_connections: 256,
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
    };
    /// The Unix socket's defaults (root-only, mode 0600): 128 connections, 30 s for a request
    /// head, 300 s idle (`fleetctl journal --follow` polls on one connection).
    pub const UNIX: ServeLimits = ServeLimits {
        max_connections: 128,
        header_read_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(300),
    };
}

/// The TCP listen backlog: connections beyond the cap wait here (up to the kernel's
/// `net.core.somaxconn`) without costing fleetd a descriptor.
const TCP_BACKLOG: u32 = 1024;

/// Binds a TCP listener on `addr` (`HOST:PORT`, the first address it resolves to) with
/// [`TCP_BACKLOG`].
pub(crate) async fn bind_tcp(addr: &str) -> io::Result<tokio::net::TcpListener> {
    let Some(sockaddr) = tokio::net::lookup_host(addr).await?.next() else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{addr} resolves to no address"),
        ));
    };
    let socket = if sockaddr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(sockaddr)?;
    socket.listen(TCP_BACKLOG)
}

/// A listener the accept loop can serve: tokio's TCP and Unix listeners, and the mutual-TLS
/// listener ([`crate::tls::TlsListener`]).
pub(crate) trait Accept: Send + 'static {
    /// The accepted stream.
    type Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    /// What the handlers learn of the peer, as axum's `ConnectInfo<Info>`.
    type Info: Clone + Send + Sync + 'static;
    /// Accepts one connection.
    fn accept_one(&mut self)
        -> impl Future<Output = io::Result<(Self::Stream, Self::Info)>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    type Info = std::net::SocketAddr;
    async fn accept_one(&mut self) -> io::Result<(Self::Stream, Self::Info)> {
        let (stream, addr) = self.accept().await?;
        // Small JSON answers: send them at once.
        let _ = stream.set_nodelay(true);
        Ok((stream, addr))
    }
}

impl Accept for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    type Info = super::UnixPeer;
    async fn accept_one(&mut self) -> io::Result<(Self::Stream, Self::Info)> {
        let (stream, _) = self.accept().await?;
        let peer = super::UnixPeer::of(&stream);
        Ok((stream, peer))
    }
}

impl Accept for crate::tls::TlsListener {
    type Stream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Info = crate::tls::Peer;
    async fn accept_one(&mut self) -> io::Result<(Self::Stream, Self::Info)> {
        self.next().await
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes; then stops
/// accepting, lets requests in flight finish (idle connections close at once) and returns
/// when every connection is gone.
pub(crate) async fn serve<L: Accept>(
    mut listener: L,
    router: Router,
    limits: ServeLimits,
    what: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut warned_full = false;
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break, // never closed
            },
        };
        if permits.available_permits() == 0 && !warned_full {
            log::warn!(
                "api: {what}: {} connections open, the cap; further clients wait until one closes",
                limits.max_connections
            );
            warned_full = true;
        } else if permits.available_permits() > 0 {
            warned_full = false;
        }
        let (stream, info) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept_one() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on a full table.
                    log::warn!("api: {what}: accept failed: {e}; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Per connection, as `axum::serve` gives it: `ConnectInfo` in every request (a thin
        // wrapper; `Router::layer` here would rebuild every route's stack per connection).
        let service = TowerToHyperService::new(router.clone().map_request(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(info.clone()));
                request
            },
        ));
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let io = TokioIo::new(IdleTimeout::new(stream, limits.idle_timeout));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(io, service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = async { drop(stop.wait_for(|s| *s).await.map(|_| ())) } => {
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            };
            if let Err(e) = result {
                log::debug!("api: connection ended: {e}");
            }
        });
    }
    let _ = stop_tx.send(true);
    // Every connection holds a permit: all of them back means all connections are gone.
    let all = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
}

/// A stream that fails with `TimedOut` once no byte has moved either way for `limit`
/// while the server waits on it.
struct IdleTimeout<S> {
    inner: S,
    limit: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<S> IdleTimeout<S> {
    fn new(inner: S, limit: Duration) -> Self {
        IdleTimeout {
            inner,
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
        }
    }

    fn progressed(&mut self) {
        let deadline = Instant::now() + self.limit;
        self.timer.as_mut().reset(deadline);
    }

    /// `Pending` becomes a `TimedOut` error once the idle limit has passed.
    fn check<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no data for {:?}: idle connection closed", self.limit),
                ))),
                Poll::Pending => Poll::Pending,
            },
            ready => {
                self.progressed();
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.check(cx, poll)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.check(cx, poll)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.check(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
