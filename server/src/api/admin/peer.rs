//! Who is on the other end of an admin socket connection, decided once, at
//! accept, from what the kernel pins to the connection; never from a PID
//! looked up at request time (a PID outlives nothing: the caller can exit
//! and its PID be reused by an operator's process).
//!
//! - uid, gid and pid: `SO_PEERCRED`, the credentials of the process that
//!   called `connect`, fixed by the kernel for the connection's life.
//! - Supplementary groups (for `admin_gids`): the kernel pins a pidfd of
//!   the connecting process to the socket (`SO_PEERPIDFD`). The groups are
//!   read from `/proc/<pid>/status`, and then the pidfd is polled: if that
//!   process is still running, the PID was not reused, so the groups read
//!   were its own. If it exited (or the kernel has no `SO_PEERPIDFD`), the
//!   connection gets no supplementary groups: only the uid and primary gid
//!   count.
//!
//! May depend on: the proto types. Used by `server.rs` (the accept loop) and
//! `admin.rs` (the caller of a request).

use crate::policy::caller::AdminPeer;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use tessera_proto::types::Operator;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tracing::warn;

/// The gRPC method of an admin request (`/tessera.admin.v1.Admin/Name`),
/// taken from the request's path before the authorizing interceptor runs
/// (tonic adds its own `GrpcMethod` only after it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalledMethod(pub String);

/// Wraps the admin service so that each request carries its
/// [`CalledMethod`] to the interceptor.
#[derive(Debug, Clone)]
pub struct WithMethod<S>(pub S);

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for WithMethod<S>
where
    S: tonic::codegen::Service<tonic::codegen::http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: tonic::codegen::http::Request<B>) -> Self::Future {
        let method = CalledMethod(request.uri().path().to_string());
        request.extensions_mut().insert(method);
        self.0.call(request)
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for WithMethod<S> {
    const NAME: &'static str = S::NAME;
}

/// The admin caller, as pinned when its connection was accepted.
pub fn operator_of<T>(request: &tonic::Request<T>) -> Option<Operator> {
    Some(request.extensions().get::<AdminPeer>()?.operator)
}

/// An accepted admin connection with its pinned peer.
#[derive(Debug)]
pub struct AdminConn {
    stream: UnixStream,
    peer: AdminPeer,
}

impl Connected for AdminConn {
    type ConnectInfo = AdminPeer;

    fn connect_info(&self) -> AdminPeer {
        self.peer.clone()
    }
}

impl AsyncRead for AdminConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for AdminConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Accepts admin connections and pins each peer before anything is read
/// from it; yields them until `shutdown`.
pub fn incoming(
    listener: UnixListener,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<AdminConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        warn!(error = %e, "admin socket accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let peer = match pin_peer(&stream) {
                Ok(peer) => peer,
                Err(e) => {
                    warn!(error = %e, "admin caller's credentials unreadable; connection closed");
                    continue;
                }
            };
            if tx.send(Ok(AdminConn { stream, peer })).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// The peer of `stream`, from `SO_PEERCRED` and `SO_PEERPIDFD`.
pub fn pin_peer(stream: &UnixStream) -> io::Result<AdminPeer> {
    let cred = stream.peer_cred()?;
    let pid = cred.pid().unwrap_or(0);
    let operator = Operator { uid: cred.uid(), gid: cred.gid(), pid };
    let groups = match nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerPidfd) {
        Ok(pidfd) if pid > 0 => groups_of_pinned(pid, &pidfd).unwrap_or_default(),
        _ => Vec::new(),
    };
    Ok(AdminPeer { operator, groups: groups.into() })
}

/// The supplementary groups of `pid`, if the process `pidfd` pins is
/// still running after they were read (so `pid` was not reused).
fn groups_of_pinned(pid: i32, pidfd: &impl AsFd) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Groups:"))?;
    let groups: Vec<u32> =
        line["Groups:".len()..].split_whitespace().filter_map(|g| g.parse().ok()).collect();
    exited(pidfd).is_ok_and(|gone| !gone).then_some(groups)
}

/// Whether the process of `pidfd` has exited (its pidfd is readable).
fn exited(pidfd: &impl AsFd) -> io::Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    let ready = poll(&mut fds, Some(&Timespec { tv_sec: 0, tv_nsec: 0 }))?;
    Ok(ready > 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_peer_is_pinned_with_its_own_groups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let _client = UnixStream::connect(&path).await.unwrap();
        let (server_side, _) = listener.accept().await.unwrap();
        let peer = pin_peer(&server_side).unwrap();
        assert_eq!(peer.operator.uid, rustix::process::getuid().as_raw());
        assert_eq!(peer.operator.pid, std::process::id() as i32);
        let mine = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = mine.lines().find(|l| l.starts_with("Groups:")).unwrap();
        let expected: Vec<u32> = line[7..].split_whitespace().map(|g| g.parse().unwrap()).collect();
        assert_eq!(&*peer.groups, expected.as_slice());
    }
}
