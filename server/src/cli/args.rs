//! What every command shares: the admin socket flag and the connection to
//! it, the selector match mode, durations, counts and JSON times. The
//! command files and the command tree (`mod.rs`) use it; it uses none of
//! them.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use tessera_proto::admin::admin_client::AdminClient;
use tonic::transport::Channel;

use crate::cli_support::{format_time, CliError};
use crate::config::DEFAULT_DATA_DIR;

/// The admin socket every admin command takes.
#[derive(Debug, Args)]
pub(super) struct SocketArg {
    /// Admin API socket [default: ./.tessera/server/admin.sock, or
    /// /run/tessera-server/admin.sock when only that one exists]. Also
    /// TESSERA_ADMIN_SOCKET.
    #[arg(long, env = ADMIN_SOCKET_ENV)]
    pub(super) socket: Option<PathBuf>,
}

/// The environment variable that names the admin socket for every command.
pub const ADMIN_SOCKET_ENV: &str = "TESSERA_ADMIN_SOCKET";

impl SocketArg {
    /// The socket to use: the flag (or `TESSERA_ADMIN_SOCKET`), else the
    /// default of a server run from here, else the system service's.
    pub(super) fn path(&self) -> PathBuf {
        if let Some(path) = &self.socket {
            return path.clone();
        }
        let local = PathBuf::from(DEFAULT_DATA_DIR).join("admin.sock");
        let system = PathBuf::from(crate::config::SYSTEM_ADMIN_SOCKET);
        if !local.exists() && system.exists() {
            system
        } else {
            local
        }
    }
}

/// How `--selector`s are compared with an entry's or agent's selectors
/// (SPIRE's `-matchSelectorsOn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum MatchMode {
    /// The same set.
    Exact,
    /// The entry's selectors are among those given.
    Subset,
    /// Those given are among the entry's (the default).
    Superset,
    /// At least one in common.
    Any,
}

impl MatchMode {
    pub(super) fn proto(self) -> i32 {
        use tessera_proto::admin::SelectorMatch;
        (match self {
            Self::Exact => SelectorMatch::Exact,
            Self::Subset => SelectorMatch::Subset,
            Self::Superset => SelectorMatch::Superset,
            Self::Any => SelectorMatch::Any,
        }) as i32
    }
}

/// A duration flag: `90`, `90s`, `15m`, `24h`, `7d`, or a sum (`1h30m`).
pub fn parse_duration(flag: &str, value: &str) -> Result<u64, CliError> {
    let bad = || {
        CliError(format!("invalid {flag} {value:?}: want a duration such as 90s, 15m, 24h or 7d"))
    };
    if value.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = value.parse::<u64>() {
        return Ok(secs);
    }
    let (mut total, mut number) = (0u64, String::new());
    for c in value.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
        number.clear();
    }
    if !number.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

/// `1 agent`, `2 agents`.
pub(super) fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A time for JSON output: RFC 3339, like the text output (`null` for 0,
/// which means "never" or "unknown"). Epoch twins are named `*_unix`.
pub(super) fn json_time(unix: i64) -> serde_json::Value {
    if unix == 0 {
        serde_json::Value::Null
    } else {
        serde_json::Value::String(format_time(unix))
    }
}

/// Connects to the admin API at the socket `socket` names.
pub(super) async fn connect(socket: &SocketArg) -> Result<AdminClient<Channel>, CliError> {
    connect_path(&socket.path()).await
}

pub(super) async fn connect_path(path: &Path) -> Result<AdminClient<Channel>, CliError> {
    Ok(crate::client::connect_admin(path).await?)
}

/// Prints a JSON document, pretty, on stdout (`--json`).
pub(super) fn print_json(value: &serde_json::Value) {
    crate::outln!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}
