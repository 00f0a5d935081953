//! Command-line plumbing shared by `tessera-server` and `tessera-agent`
//! (compiled into both crates): argument parsing with one-line errors,
//! logging, signals and time formatting.

use std::fmt::Display;
use std::process::ExitCode;

/// A failed command: a one-line message, exit code 1.
#[derive(Debug)]
pub struct CliError(pub String);

impl Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.replace('\n', " "))
    }
}

impl From<String> for CliError {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<tessera_workload_api::ClientError> for CliError {
    fn from(e: tessera_workload_api::ClientError) -> Self {
        Self(e.to_string())
    }
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> Self {
        Self(status.message().to_string())
    }
}

/// Flags as SPIRE spells them, and Tessera's spellings (`|`: the first one
/// the command has; empty: Tessera has no such flag; `=text`: what to do
/// instead). A spelling is suggested only when the command typed has it.
const SPIRE_SPELLINGS: &[(&str, &str)] = &[
    ("-spiffeID", "--spiffe-id|--id"),
    ("-parentID", "--parent-id"),
    ("-selector", "--selector"),
    ("-audience", "--audience"),
    ("-socketPath", "--socket"),
    ("-write", "--write"),
    ("-entryID", "--id"),
    ("-id", "--id"),
    ("-x509SVIDTTL", "--x509-svid-ttl"),
    ("-jwtSVIDTTL", "--jwt-svid-ttl"),
    ("-ttl", "--ttl"),
    ("-dns", "--dns-name"),
    ("-hint", "--hint"),
    ("-entryExpiry", "--expires-at"),
    ("-matchSelectorsOn", "--match"),
    ("-expiredFor", "--expired-for"),
    ("-dryRun", "--dry-run"),
    ("-config", "--config"),
    ("-dataDir", "--data-dir"),
    ("-trustDomain", "--trust-domain"),
    ("-joinToken", "--join-token|--join-token-file"),
    ("-serverAddress", "--server-address"),
    ("-logLevel", "--log-level"),
    ("-token", "--token"),
    ("-reason", "--reason"),
    ("-output", "--json"),
    ("-format", "--format"),
    ("-svid", "=Tessera takes the token as an argument: api validate jwt --audience A TOKEN"),
    ("-shallow", "=Tessera's healthcheck has one mode"),
    ("-silent", "=Tessera's api fetch prints one block per SVID; --json for machines"),
    ("-federatesWith", ""),
    ("-node", ""),
    ("-admin", ""),
    ("-downstream", ""),
    ("-storeSVID", ""),
];

/// What to tell someone who typed `arg` the way SPIRE spells it (a single
/// dash and a word), if it is not one of the command's own: `long_flags`
/// are the long flags of the command typed.
pub fn spire_hint(arg: &str, long_flags: &[String]) -> Option<String> {
    let name = arg.split_once('=').map_or(arg, |(name, _)| name);
    let word = name.strip_prefix('-')?;
    let starts_with_letter = word.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    if !starts_with_letter || word.len() < 2 || !word.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    let has = |flag: &str| long_flags.iter().any(|f| f == flag.trim_start_matches('-'));
    let known = SPIRE_SPELLINGS.iter().find(|(spire, _)| *spire == name).map(|(_, ours)| *ours);
    let candidates = match known {
        Some("") => {
            return Some(format!(
                "{name} is SPIRE's; Tessera has no such option (the README's \"SPIRE's CLI in Tessera\" table says what to use instead)"
            ))
        }
        Some(text) if text.starts_with('=') => {
            return Some(format!("{name} is SPIRE's; {}", &text[1..]))
        }
        Some(ours) => ours.split('|').map(str::to_string).collect(),
        // SPIRE's camelCase, in Tessera's kebab-case.
        None => vec![format!("--{}", kebab(word))],
    };
    match candidates.iter().find(|flag| has(flag)) {
        Some(ours) if name == "-output" => {
            Some(format!("{name} json is SPIRE's spelling; Tessera's is {ours}"))
        }
        Some(ours) => Some(format!("{name} is SPIRE's spelling; Tessera's is {ours}")),
        // Single-dash words are never Tessera's: say so rather than let
        // clap read `-spiffeID` as `-s -p -i ...`.
        None if word.len() > 2 => Some(format!(
            "{name} is not a flag of this command (Tessera's flags are --kebab-case: see --help)"
        )),
        None => None,
    }
}

/// `spiffeID` → `spiffe-id`, `socketPath` → `socket-path`.
fn kebab(camel: &str) -> String {
    let mut out = String::new();
    let mut previous_upper = true;
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            if !previous_upper {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
            previous_upper = true;
        } else {
            out.push(c);
            previous_upper = false;
        }
    }
    out
}

/// The long flags of the (sub)command the arguments name: the words that
/// name subcommands are followed down from the top.
fn typed_command_flags(top: &clap::Command, args: &[std::ffi::OsString]) -> Vec<String> {
    let mut command = top;
    for arg in args.iter().skip(1).filter_map(|a| a.to_str()) {
        if arg.starts_with('-') {
            continue;
        }
        match command.find_subcommand(arg) {
            Some(sub) => command = sub,
            None => break,
        }
    }
    command.get_arguments().filter_map(|a| a.get_long().map(str::to_string)).collect()
}

/// Clap's error as one line: its message with every detail line (the
/// missing flags' names, a tip), without the usage that follows.
pub fn one_line(rendered: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for line in rendered.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if !line.is_empty() {
            parts.push(line);
        }
    }
    let mut text = String::new();
    for part in parts {
        if !text.is_empty() {
            text.push_str(if text.ends_with(':') { " " } else { "; " });
        }
        text.push_str(part);
    }
    if text.is_empty() {
        "error: invalid arguments".into()
    } else {
        text
    }
}

/// Parses the command line. Help and version are printed as clap renders
/// them; any other problem becomes one line on stderr (naming the missing
/// flags, or Tessera's spelling of a SPIRE flag) and exit code 2.
pub fn parse_args<C: clap::Parser>() -> Result<C, ExitCode> {
    parse_from(std::env::args_os())
}

/// Turns transparent huge pages off for this process (and its children).
/// The allocator asks for huge pages (`madvise`), and then every 2 MiB
/// region it touches is resident and zeroed whole: measured with 10,000
/// agents connected, the server held 1,133 MB with them and 537 MB
/// without (`tessera-bench scale10k`, same run). Best effort: a kernel
/// without the flag just keeps its default.
pub fn small_pages_only() {
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}

/// Most threads the runtime starts for blocking work (store reads and
/// commits, signing, `/proc` reads). Tokio's default is 512; each thread
/// has its own allocator cache, and on mimalloc (the allocator then) each
/// its own heap, where what a thread allocated and something else keeps
/// (an entry read for the change feed, a snapshot) pins that heap's pages.
/// With 10,000 agents the server grew ~60 such threads and held 1,314 MB
/// with 100,000 entries; with this bound it held 897–914 MB in three runs
/// (`tessera-bench scale10k --servers 1`, on mimalloc).
/// Blocking work past the bound queues. Blocking work that waits, waits
/// only for work already running (a writer lock, a batch's leader, a
/// PostgreSQL connection in use), so the bound cannot deadlock.
pub const MAX_BLOCKING_THREADS: usize = 16;

/// The multi-threaded runtime `tessera-server`, `tessera-agent` and the
/// bench run on: tokio's defaults but [`MAX_BLOCKING_THREADS`], whose
/// threads stay for a minute when idle instead of ten seconds (a thread
/// that exits leaves its heap's pages to be reclaimed by others).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_keep_alive(std::time::Duration::from_secs(60))
        .build()
}

/// A binary's `main`: the arguments parsed as `C` (a one-line error and
/// exit code 2 when they are not), then `run` [`on_runtime`], its error
/// printed as one line with exit code 1.
pub fn main_with<C, F>(run: impl FnOnce(C) -> F) -> ExitCode
where
    C: clap::Parser,
    F: std::future::Future<Output = Result<(), CliError>>,
{
    let cli = match parse_args::<C>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    exit_code(on_runtime(run(cli)).and_then(|ran| ran))
}

/// Runs `fut` to completion as the binaries run: small pages only, on
/// [`runtime`].
pub fn on_runtime<T>(fut: impl std::future::Future<Output = T>) -> Result<T, CliError> {
    small_pages_only();
    let runtime = runtime().map_err(|e| CliError(format!("cannot start the runtime: {e}")))?;
    Ok(runtime.block_on(fut))
}

/// Lowers the calling thread's CPU priority to `nice` (only this thread:
/// Linux keeps a nice value per thread); a thread already at `nice` or
/// lower (a process started with `nice -n 15`) is left as it is, never
/// raised. For threads doing background work that must not take the CPU
/// from the threads answering requests when both want it; the kernel still
/// gives them their share (a thread at nice 10 gets about a tenth of what
/// one at 0 does), so they are slowed, never starved. Best effort: where
/// it is refused, the thread keeps its priority.
pub fn lower_this_thread_priority(nice: i32) {
    let me = Some(rustix::thread::gettid());
    if rustix::process::getpriority_process(me).is_ok_and(|now| now < nice) {
        let _ = rustix::process::setpriority_process(me, nice);
    }
}

/// [`parse_args`] over given arguments (the first is the program).
pub fn parse_from<C: clap::Parser, I, T>(args: I) -> Result<C, ExitCode>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::error::ErrorKind;
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    C::try_parse_from(&args).map_err(|e| match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(2)
        }
        _ => {
            let flags = typed_command_flags(&C::command(), &args);
            let hints: Vec<String> = args
                .iter()
                .skip(1)
                .take_while(|a| *a != "--")
                .filter_map(|a| a.to_str())
                .filter_map(|a| spire_hint(a, &flags))
                .collect();
            if hints.is_empty() {
                eprintln!("{} (see --help)", one_line(&e.render().to_string()));
            } else {
                eprintln!("error: {} (see --help)", hints.join("; "));
            }
            ExitCode::from(2)
        }
    })
}

/// The exit code of a finished command; a failure is printed as one line.
/// Log lines still queued are written first.
pub fn exit_code<E: Display>(result: Result<(), E>) -> ExitCode {
    flush_logs();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.to_string().replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Writes a command's output to stdout. When the reader has gone (`| head`),
/// the command ends quietly with exit code 0 instead of panicking as
/// `println!` does; any other write error ends it with one line.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        flush_logs();
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

/// `println!` for a command's output, quiet when the reader has gone.
#[macro_export]
macro_rules! outln {
    () => { $crate::cli_support::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::cli_support::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for a command's output, quiet when the reader has gone.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli_support::write_stdout(format_args!($($arg)*)) };
}

/// A token cancelled on Ctrl-C or SIGTERM (logged as "shutting down"):
/// what `run` stops on.
pub fn shutdown_on_signal() -> tokio_util::sync::CancellationToken {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    shutdown
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

/// Logs to stderr with the given filter (`RUST_LOG` wins when set); colour
/// codes only when stderr is a terminal, so files and journals get plain text.
/// Lines go through a bounded queue to a thread of their own: a log reader
/// that stops reading or goes away never blocks the process (its
/// shutdown included); lines that do not fit are dropped and counted.
pub fn init_logging(filter: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let writer = log_queue::LogQueue::start();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        // One JSON object per line: timestamp, level, target, fields.
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Writes the log lines still queued (waiting at most a second).
pub fn flush_logs() {
    log_queue::flush(std::time::Duration::from_secs(1));
}

mod log_queue {
    //! The queue between the logging call sites and stderr.

    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
    use std::sync::OnceLock;
    use std::time::Duration;

    /// Lines queued at most; beyond, lines are dropped.
    const QUEUE_LINES: usize = 16 * 1024;

    enum Message {
        Line(Vec<u8>),
        Flush(SyncSender<()>),
    }

    static QUEUE: OnceLock<SyncSender<Message>> = OnceLock::new();
    static DROPPED: AtomicU64 = AtomicU64::new(0);

    /// The writer handed to `tracing_subscriber`.
    #[derive(Debug, Clone, Copy)]
    pub struct LogQueue;

    impl LogQueue {
        pub fn start() -> Self {
            QUEUE.get_or_init(|| {
                let (tx, rx) = sync_channel(QUEUE_LINES);
                let spawned = std::thread::Builder::new()
                    .name("log-writer".into())
                    .spawn(move || write_lines(rx));
                if spawned.is_err() {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
                tx
            });
            Self
        }
    }

    fn write_lines(rx: Receiver<Message>) {
        let mut reported = 0;
        for message in rx {
            let mut stderr = std::io::stderr().lock();
            match message {
                Message::Line(line) => {
                    let dropped = DROPPED.load(Ordering::Relaxed);
                    if dropped > reported {
                        let _ = writeln!(
                            stderr,
                            "({} log lines dropped: stderr is not read fast enough)",
                            dropped - reported
                        );
                        reported = dropped;
                    }
                    // A reader that has gone is no reason to stop anything.
                    let _ = stderr.write_all(&line);
                }
                Message::Flush(done) => {
                    let _ = stderr.flush();
                    let _ = done.send(());
                }
            }
        }
    }

    /// Waits until the lines queued so far are written, at most `wait`.
    pub fn flush(wait: Duration) {
        let Some(queue) = QUEUE.get() else { return };
        let (done_tx, done_rx) = sync_channel(1);
        if queue.try_send(Message::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv_timeout(wait);
        }
    }

    /// One log line being formatted; queued whole when dropped.
    pub struct Line(Vec<u8>);

    impl Write for Line {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Drop for Line {
        fn drop(&mut self) {
            if self.0.is_empty() {
                return;
            }
            let line = std::mem::take(&mut self.0);
            match QUEUE.get().map(|q| q.try_send(Message::Line(line))) {
                Some(Ok(())) => {}
                Some(Err(TrySendError::Full(_) | TrySendError::Disconnected(_))) | None => {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogQueue {
        type Writer = Line;

        fn make_writer(&'a self) -> Self::Writer {
            Line(Vec::with_capacity(256))
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// For people: one line per event, coloured on a terminal.
    #[default]
    Text,
    /// For machines: one JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?}: want text or json")),
        }
    }
}

/// RFC 3339 for a Unix time.
pub fn format_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_keep_the_names_of_missing_flags_on_one_line() {
        let rendered = "error: the following required arguments were not provided:\n  --spiffe-id <SPIFFE_ID>\n  --audience <AUDIENCE>\n\nUsage: tessera-agent api fetch jwt --spiffe-id <SPIFFE_ID>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line(rendered),
            "error: the following required arguments were not provided: --spiffe-id <SPIFFE_ID>; --audience <AUDIENCE>"
        );
        let tip = "error: unexpected argument '--spife-id' found\n\n  tip: a similar argument exists: '--spiffe-id'\n\nUsage: x\n";
        assert_eq!(
            one_line(tip),
            "error: unexpected argument '--spife-id' found; tip: a similar argument exists: '--spiffe-id'"
        );
    }

    #[test]
    fn spire_spellings_name_the_tessera_flag_the_binary_has() {
        let flags: Vec<String> =
            ["spiffe-id", "parent-id", "socket", "json", "x509-svid-ttl", "dry-run", "format"]
                .map(String::from)
                .to_vec();
        assert_eq!(
            spire_hint("-spiffeID", &flags).as_deref(),
            Some("-spiffeID is SPIRE's spelling; Tessera's is --spiffe-id")
        );
        assert_eq!(
            spire_hint("-spiffeID", &["id".to_string()]).as_deref(),
            Some("-spiffeID is SPIRE's spelling; Tessera's is --id"),
            "a command that names agents by --id"
        );
        assert_eq!(
            spire_hint("-socketPath=/tmp/x", &flags).as_deref(),
            Some("-socketPath is SPIRE's spelling; Tessera's is --socket")
        );
        assert_eq!(
            spire_hint("-output", &flags).as_deref(),
            Some("-output json is SPIRE's spelling; Tessera's is --json")
        );
        assert_eq!(
            spire_hint("-format", &flags).as_deref(),
            Some("-format is SPIRE's spelling; Tessera's is --format")
        );
        assert_eq!(
            spire_hint("-dryRun", &flags).as_deref(),
            Some("-dryRun is SPIRE's spelling; Tessera's is --dry-run")
        );
        assert!(spire_hint("-federatesWith", &flags).unwrap().contains("no such option"));
        assert!(spire_hint("-svid", &flags).unwrap().contains("TOKEN"));
        assert!(spire_hint("-shallow", &flags).unwrap().contains("one mode"));
        // A SPIRE-style word the command does not have is still not clap's `-s -p ...`.
        assert!(spire_hint("-write", &flags).unwrap().contains("not a flag of this command"));
        assert_eq!(spire_hint("-h", &flags), None);
        assert_eq!(spire_hint("--spiffe-id", &flags), None);
        assert_eq!(spire_hint("-", &flags), None);
        assert_eq!(spire_hint("-100", &flags), None, "a negative number is a value");
        assert_eq!(kebab("x509SVIDTTL"), "x509-svidttl");
        assert_eq!(kebab("dataDir"), "data-dir");
    }
}
