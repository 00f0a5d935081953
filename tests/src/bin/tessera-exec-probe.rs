//! A test helper for the Workload API's exec checks: a process that
//! connects to the agent's socket as one program and then asks for an SVID
//! as another, keeping the same connection (and, in `exec-into`, the same
//! PID). Copies of this binary at different paths (and with different
//! contents) stand for the "trusted" and the "untrusted" program.
//!
//! ```text
//! tessera-exec-probe fetch (--socket PATH | --stdin) [--after-exec-of PID --not PATH]
//!     One FetchX509SVID on a new connection, or on the socket inherited as
//!     standard input (after PID has stopped running the executable PATH).
//!     Prints one line: `svid <spiffe_id>` or `refused <code> <message>`.
//! tessera-exec-probe exec-into --socket PATH -- PROG ARGS...
//!     Connects, waits until the agent has accepted (and so attested) the
//!     connection, then execs `PROG ARGS...` in the same process, the
//!     socket inherited as its standard input.
//! tessera-exec-probe hand-over --socket PATH -- PROG ARGS...
//!     Connects and waits as above, starts a child `<this program> fetch
//!     --stdin --after-exec-of <own PID> --not <own executable>` holding the
//!     socket, then execs `PROG ARGS...` itself: the PID that connected now
//!     runs PROG while the child, still this program, asks on its socket.
//! tessera-exec-probe watch-exec --socket PATH -- PROG ARGS...
//!     Connects, opens a FetchX509SVID stream, and once its first response
//!     is in prints `streaming <spiffe_id>` and execs `PROG ARGS...` with
//!     the socket as standard input: the stream stays open, with another
//!     program on its end.
//! tessera-exec-probe raw-read --stdin --look-for TEXT
//!     Prints `ready`, then reads the raw bytes of the socket on standard
//!     input (at most 30 s, until it is closed, or until TEXT comes by) and
//!     prints `saw` if TEXT came by, else `not-seen`, and then `open`,
//!     `closed` or `timeout`.
//! tessera-exec-probe sleep SECONDS
//! ```
#![forbid(unsafe_code)]
#![allow(clippy::print_stdout)]

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use tessera_proto::workload as pb;

/// How long any wait of the probe may take.
const WAIT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera-exec-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

/// What follows `--`.
fn command_after_dashes(args: &[String]) -> Result<&[String], String> {
    let at = args.iter().position(|a| a == "--").ok_or("missing `-- PROG ARGS...`")?;
    let command = &args[at + 1..];
    if command.is_empty() {
        return Err("missing PROG after `--`".into());
    }
    Ok(command)
}

fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("fetch") => {
            if let (Some(pid), Some(not)) = (flag(args, "--after-exec-of"), flag(args, "--not")) {
                wait_for_exec(pid, not)?;
            }
            let socket = match flag(args, "--socket") {
                Some(path) => {
                    UnixStream::connect(path).map_err(|e| format!("connect {path}: {e}"))?
                }
                None if args.iter().any(|a| a == "--stdin") => {
                    let fd = std::io::stdin().as_fd().try_clone_to_owned();
                    UnixStream::from(fd.map_err(|e| format!("standard input: {e}"))?)
                }
                None => return Err("fetch needs --socket or --stdin".into()),
            };
            let line = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?
                .block_on(fetch(socket))?;
            println!("{line}");
            Ok(())
        }
        Some("exec-into") => {
            let socket = connect_and_wait(args)?;
            let command = command_after_dashes(args)?;
            let err = Command::new(&command[0])
                .args(&command[1..])
                .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(socket)))
                .exec();
            Err(format!("exec {}: {err}", command[0]))
        }
        Some("hand-over") => {
            let socket = connect_and_wait(args)?;
            let command = command_after_dashes(args)?;
            let me = std::env::current_exe().map_err(|e| e.to_string())?;
            Command::new(&me)
                .arg("fetch")
                .arg("--stdin")
                .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(socket)))
                .arg("--after-exec-of")
                .arg(std::process::id().to_string())
                .arg("--not")
                .arg(&me)
                .spawn()
                .map_err(|e| format!("start the child: {e}"))?;
            let err = Command::new(&command[0]).args(&command[1..]).exec();
            Err(format!("exec {}: {err}", command[0]))
        }
        Some("watch-exec") => {
            let path = flag(args, "--socket").ok_or("missing --socket")?;
            let command = command_after_dashes(args)?;
            let socket = UnixStream::connect(path).map_err(|e| format!("connect {path}: {e}"))?;
            let kept = socket.try_clone().map_err(|e| e.to_string())?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            let first = runtime.block_on(async move {
                let mut client = client_over(socket).await?;
                let mut stream = client
                    .fetch_x509svid(with_header(pb::X509svidRequest {}))
                    .await
                    .map_err(|s| format!("FetchX509SVID: {s}"))?
                    .into_inner();
                let first = stream
                    .message()
                    .await
                    .map_err(|s| format!("FetchX509SVID: {s}"))?
                    .ok_or("the stream ended")?;
                // Both stay open (leaked on purpose) through the exec.
                std::mem::forget(stream);
                std::mem::forget(client);
                Ok::<_, String>(first)
            })?;
            let id = first.svids.first().map(|s| s.spiffe_id.clone()).unwrap_or_default();
            println!("streaming {id}");
            std::mem::forget(runtime);
            let err = Command::new(&command[0])
                .args(&command[1..])
                .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(kept)))
                .exec();
            Err(format!("exec {}: {err}", command[0]))
        }
        Some("raw-read") => {
            use std::io::Read;
            let text = flag(args, "--look-for").ok_or("missing --look-for")?.as_bytes();
            let fd = std::io::stdin().as_fd().try_clone_to_owned();
            let mut socket = UnixStream::from(fd.map_err(|e| format!("standard input: {e}"))?);
            // Whoever had it before may have left it non-blocking.
            socket.set_nonblocking(false).map_err(|e| e.to_string())?;
            println!("ready");
            let deadline = std::time::Instant::now() + WAIT;
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            let ending = loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break "timeout";
                }
                socket.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
                match socket.read(&mut buf) {
                    Ok(0) => break "closed",
                    Ok(n) => {
                        seen.extend_from_slice(&buf[..n]);
                        if seen.windows(text.len()).any(|w| w == text) {
                            break "open";
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break "timeout",
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break "timeout",
                    Err(_) => break "closed",
                }
            };
            let saw = seen.windows(text.len()).any(|w| w == text);
            println!("{} {ending}", if saw { "saw" } else { "not-seen" });
            Ok(())
        }
        Some("sleep") => {
            let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(30);
            std::thread::sleep(Duration::from_secs(seconds));
            Ok(())
        }
        _ => Err("usage: tessera-exec-probe fetch|exec-into|hand-over|sleep ...".into()),
    }
}

/// Connects to `--socket` and waits until the agent's first bytes (its
/// HTTP/2 SETTINGS) are there, without reading them: the agent sends them
/// only once it has accepted and attested the connection.
fn connect_and_wait(args: &[String]) -> Result<UnixStream, String> {
    let path = flag(args, "--socket").ok_or("missing --socket")?;
    let socket = UnixStream::connect(path).map_err(|e| format!("connect {path}: {e}"))?;
    socket.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    let mut byte = [0u8; 1];
    let (n, _) = rustix::net::recv(&socket, &mut byte, rustix::net::RecvFlags::PEEK)
        .map_err(|e| format!("waiting for the agent to accept: {e}"))?;
    if n == 0 {
        return Err("the agent closed the connection".into());
    }
    socket.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(socket)
}

/// Waits until process `pid` no longer runs the executable `not`.
fn wait_for_exec(pid: &str, not: &str) -> Result<(), String> {
    let exe = PathBuf::from(format!("/proc/{pid}/exe"));
    let deadline = std::time::Instant::now() + WAIT;
    while std::fs::read_link(&exe).map_err(|e| format!("{}: {e}", exe.display()))?
        == std::path::Path::new(not)
    {
        if std::time::Instant::now() > deadline {
            return Err(format!("process {pid} did not exec within {WAIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// A Workload API request with the security header.
fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("workload.spiffe.io", tonic::metadata::MetadataValue::from_static("true"));
    request
}

/// A Workload API client over `socket` (one connection, never redialed).
async fn client_over(
    socket: UnixStream,
) -> Result<
    pb::spiffe_workload_api_client::SpiffeWorkloadApiClient<tonic::transport::Channel>,
    String,
> {
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    let socket = tokio::net::UnixStream::from_std(socket).map_err(|e| e.to_string())?;
    let socket = std::sync::Arc::new(std::sync::Mutex::new(Some(socket)));
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let stream = socket.lock().map(|mut s| s.take()).ok().flatten();
            async move {
                let stream =
                    stream.ok_or_else(|| std::io::Error::other("the socket was used already"))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| format!("HTTP/2 connection: {e}"))?;
    Ok(pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel))
}

/// One FetchX509SVID over `socket`.
async fn fetch(socket: UnixStream) -> Result<String, String> {
    let mut client = client_over(socket).await?;
    let first = match client.fetch_x509svid(with_header(pb::X509svidRequest {})).await {
        Ok(response) => response.into_inner().message().await,
        Err(status) => Err(status),
    };
    Ok(match first {
        Ok(Some(response)) => format!(
            "svid {}",
            response.svids.first().map(|s| s.spiffe_id.as_str()).unwrap_or("(none)")
        ),
        Ok(None) => "refused Unknown the stream ended without a response".into(),
        Err(status) => {
            format!("refused {:?} {}", status.code(), status.message().replace('\n', " "))
        }
    })
}
