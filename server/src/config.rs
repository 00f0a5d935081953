//! Server configuration: a TOML file, with command-line flags on top.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tessera_workload_api::TrustDomain;

/// Connections on the node API at once, by default (`node_max_connections`;
/// lowered to fit the process's file descriptor limit).
pub const DEFAULT_NODE_MAX_CONNECTIONS: usize = 10_000;

/// Connections without a verified agent SVID from one source address at
/// once, by default (`node_max_unauthenticated_per_ip`).
pub const DEFAULT_NODE_MAX_UNAUTHENTICATED_PER_IP: usize = 32;

/// Errors in the server's configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema (unknown keys included).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's one-line reason.
        message: String,
    },
    /// No trust domain was given.
    #[error(
        "trust domain is required: pass --trust-domain or set trust_domain in the config file"
    )]
    MissingTrustDomain,
    /// The trust domain is not a valid SPIFFE trust domain name.
    #[error("invalid trust domain: {0}")]
    TrustDomain(tessera_workload_api::SpiffeIdError),
    /// A setting is out of range.
    #[error("invalid setting {key}: {reason}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// The config file's schema. Every field is optional; flags override it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Trust domain name, e.g. `example.org`.
    pub trust_domain: Option<String>,
    /// Data directory (store, CA keys, admin socket).
    pub data_dir: Option<PathBuf>,
    /// Where the store lives: unset for sled in `<data_dir>/store`, or
    /// `postgres://USER@HOST/DB` for PostgreSQL shared by several servers.
    pub datastore: Option<String>,
    /// Node API address.
    pub bind: Option<SocketAddr>,
    /// Admin API Unix socket; default `<data_dir>/admin.sock`, or with
    /// operators configured one they can reach ([`default_admin_socket`]).
    pub admin_socket: Option<PathBuf>,
    /// CA certificate lifetime, seconds.
    pub ca_ttl: Option<u64>,
    /// Fraction of the CA's lifetime after which the next CA is prepared
    /// (published in the bundle, not yet signing).
    pub ca_prepare_at: Option<f64>,
    /// Fraction of the CA's lifetime after which the prepared CA takes over.
    pub ca_activate_at: Option<f64>,
    /// Default X509-SVID lifetime for entries that set none, seconds.
    pub default_x509_svid_ttl: Option<u32>,
    /// Largest X509-SVID lifetime an entry may ask for, seconds.
    pub max_x509_svid_ttl: Option<u32>,
    /// Agent X509-SVID lifetime, seconds.
    pub agent_svid_ttl: Option<u32>,
    /// Default JWT-SVID lifetime for entries that set none, seconds.
    pub default_jwt_svid_ttl: Option<u32>,
    /// Largest JWT-SVID lifetime an entry may ask for, seconds.
    pub max_jwt_svid_ttl: Option<u32>,
    /// Kind of new JWT signing keys: `ec-p256` (ES256) or `rsa-2048` (RS256).
    pub jwt_key_type: Option<String>,
    /// Default join token lifetime, seconds.
    pub join_token_ttl: Option<u32>,
    /// CSRs per second each agent may have signed (SPIRE: 500).
    pub sign_rate: Option<u32>,
    /// CSRs an agent may have signed at once before `sign_rate` applies.
    pub sign_burst: Option<u32>,
    /// Changes the change log keeps (default 100,000); an agent whose
    /// revision is older gets a snapshot of its entries instead.
    pub change_log_keep: Option<u64>,
    /// Node API connections at once (default 10,000, lowered to fit the
    /// file descriptor limit).
    pub node_max_connections: Option<usize>,
    /// Node API connections without a client certificate (handshaking or
    /// attesting) from one source address at once (default 32).
    pub node_max_unauthenticated_per_ip: Option<usize>,
    /// Refused attestations per second one source address may make once its
    /// burst is spent (SPIRE: 1 attestation per second per address).
    pub attest_rate: Option<f64>,
    /// Refused attestations one source address may make at once before
    /// `attest_rate` applies (default 10).
    pub attest_burst: Option<u32>,
    /// Log filter (`info`, `debug`, `tessera_server=debug`, ...).
    pub log_level: Option<String>,
    /// `text` (default) or `json`: one JSON object per log line.
    pub log_format: Option<String>,
    /// Address for Prometheus metrics, `/live` and `/ready` (off when unset).
    pub metrics_addr: Option<SocketAddr>,
    /// Uids allowed to use the admin socket, besides root and the server's own uid.
    pub admin_uids: Option<Vec<u32>>,
    /// Groups whose members may use the admin socket.
    pub admin_gids: Option<Vec<u32>>,
    /// Store the event stream (default true; false only logs events and
    /// detects no anomalies).
    pub events: Option<bool>,
    /// Seconds events are kept (default 30 days; 0: forever).
    pub event_retention: Option<u64>,
    /// A JSON-lines file every stored event is appended to, for a SIEM.
    pub event_file: Option<PathBuf>,
    /// Refusals per minute from one agent or one uid above which an
    /// `anomaly.refusal_burst` event is recorded (default 30; 0: off).
    pub anomaly_refusals_per_minute: Option<u32>,
    /// What needs a second operator's approval.
    pub approval: Option<crate::policy::governance::ApprovalPolicy>,
    /// The token broker (off when unset).
    pub broker: Option<crate::broker::config::BrokerFileConfig>,
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().replace('\n', " "),
        })
    }
}

/// The server's resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The trust domain this server is the CA of.
    pub trust_domain: TrustDomain,
    /// Where the store and CA keys live.
    pub data_dir: PathBuf,
    /// A PostgreSQL URL when the store is shared by several servers;
    /// `None` for sled in `<data_dir>/store`.
    pub datastore: Option<String>,
    /// Node API address (TLS). Port 0 picks a free port.
    pub bind: SocketAddr,
    /// Admin API socket path.
    pub admin_socket: PathBuf,
    /// CA lifetime, seconds.
    pub ca_ttl: u64,
    /// Fraction of CA lifetime at which the next CA is prepared.
    pub ca_prepare_at: f64,
    /// Fraction of CA lifetime at which the next CA is activated.
    pub ca_activate_at: f64,
    /// Default X509-SVID TTL, seconds.
    pub default_x509_svid_ttl: u32,
    /// Maximum X509-SVID TTL, seconds.
    pub max_x509_svid_ttl: u32,
    /// Agent SVID TTL, seconds.
    pub agent_svid_ttl: u32,
    /// Default JWT-SVID TTL, seconds.
    pub default_jwt_svid_ttl: u32,
    /// Maximum JWT-SVID TTL, seconds.
    pub max_jwt_svid_ttl: u32,
    /// Kind of new JWT signing keys.
    pub jwt_key_type: crate::ca::jwt::JwtKeyType,
    /// Default join token TTL, seconds.
    pub join_token_ttl: u32,
    /// CSRs per second per agent.
    pub sign_rate: u32,
    /// Burst of CSRs per agent.
    pub sign_burst: u32,
    /// Changes the change log keeps.
    pub change_log_keep: u64,
    /// Node API connections at once.
    pub node_max_connections: usize,
    /// Unauthenticated node API connections per source address at once.
    pub node_max_unauthenticated_per_ip: usize,
    /// Refused attestations per second per source address, after the burst.
    pub attest_rate: f64,
    /// Refused attestations per source address at once.
    pub attest_burst: u32,
    /// Log filter.
    pub log_level: String,
    /// Log line format.
    pub log_format: crate::cli_support::LogFormat,
    /// Metrics and health address.
    pub metrics_addr: Option<SocketAddr>,
    /// Extra operator uids.
    pub admin_uids: Vec<u32>,
    /// Operator groups.
    pub admin_gids: Vec<u32>,
    /// Event log settings.
    pub events: crate::events::EventConfig,
    /// The approval policy.
    pub approval: crate::policy::governance::ApprovalPolicy,
    /// The token broker, when configured.
    pub broker: Option<crate::broker::config::BrokerConfig>,
}

fn set_vec(target: &mut Vec<u32>, value: Option<Vec<u32>>) {
    if let Some(v) = value {
        *target = v;
    }
}

/// The server's default data directory.
pub const DEFAULT_DATA_DIR: &str = ".tessera/server";

/// The admin socket of a server run by root with operators configured
/// (as `deploy/` sets it up); the CLI tries it when the local one is missing.
pub const SYSTEM_ADMIN_SOCKET: &str = "/run/tessera-server/admin.sock";

/// Where the admin socket goes when the configuration names none. Alone
/// (no `admin_uids`/`admin_gids`) it is `<data_dir>/admin.sock`, inside the
/// private data dir. With operators it must be somewhere they can reach:
/// [`SYSTEM_ADMIN_SOCKET`] when the server runs as root, else
/// `<data_dir>-admin/admin.sock`, a sibling directory the server creates
/// 0755 (the data dir stays 0700).
pub fn default_admin_socket(data_dir: &Path, operators: bool, euid: u32) -> PathBuf {
    if !operators {
        return data_dir.join("admin.sock");
    }
    if euid == 0 {
        return PathBuf::from(SYSTEM_ADMIN_SOCKET);
    }
    let mut sibling = data_dir.as_os_str().to_owned();
    sibling.push("-admin");
    PathBuf::from(sibling).join("admin.sock")
}

impl Config {
    /// Defaults for a trust domain and data directory.
    pub fn new(trust_domain: TrustDomain, data_dir: PathBuf) -> Self {
        let admin_socket = data_dir.join("admin.sock");
        Self {
            trust_domain,
            data_dir,
            datastore: None,
            bind: SocketAddr::from(([127, 0, 0, 1], 8081)),
            admin_socket,
            ca_ttl: 24 * 3600,
            ca_prepare_at: 0.5,
            ca_activate_at: 5.0 / 6.0,
            default_x509_svid_ttl: 3600,
            max_x509_svid_ttl: 14 * 24 * 3600,
            agent_svid_ttl: 3600,
            default_jwt_svid_ttl: 300,
            max_jwt_svid_ttl: 24 * 3600,
            jwt_key_type: crate::ca::jwt::JwtKeyType::EcP256,
            join_token_ttl: 600,
            sign_rate: 500,
            sign_burst: 20_000,
            change_log_keep: 100_000,
            node_max_connections: DEFAULT_NODE_MAX_CONNECTIONS,
            node_max_unauthenticated_per_ip: DEFAULT_NODE_MAX_UNAUTHENTICATED_PER_IP,
            attest_rate: 1.0,
            attest_burst: 10,
            log_level: "info".into(),
            log_format: crate::cli_support::LogFormat::Text,
            metrics_addr: None,
            admin_uids: Vec::new(),
            admin_gids: Vec::new(),
            events: crate::events::EventConfig::default(),
            approval: crate::policy::governance::ApprovalPolicy::default(),
            broker: None,
        }
    }

    /// Builds the configuration from a file's settings; every `Some` in
    /// `flags` overrides the file.
    pub fn resolve(file: FileConfig, flags: FileConfig) -> Result<Self, ConfigError> {
        let td = flags.trust_domain.or(file.trust_domain).ok_or(ConfigError::MissingTrustDomain)?;
        let trust_domain = TrustDomain::new(&td).map_err(ConfigError::TrustDomain)?;
        let data_dir =
            flags.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let mut config = Config::new(trust_domain, data_dir);
        config.datastore = flags.datastore.or(file.datastore);
        if let Some(url) = &config.datastore {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(ConfigError::Invalid {
                    key: "datastore",
                    reason: format!(
                        "{:?} is not a postgres:// URL (leave it unset for the embedded store)",
                        crate::store::postgres::redact(url)
                    ),
                });
            }
        }
        if let Some(bind) = flags.bind.or(file.bind) {
            config.bind = bind;
        }
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(v) = flags.$field.or(file.$field) { config.$field = v; }
            )*};
        }
        set!(
            ca_ttl,
            ca_prepare_at,
            ca_activate_at,
            default_x509_svid_ttl,
            max_x509_svid_ttl,
            agent_svid_ttl,
            default_jwt_svid_ttl,
            max_jwt_svid_ttl,
            join_token_ttl,
            sign_rate,
            sign_burst,
            change_log_keep,
            node_max_connections,
            node_max_unauthenticated_per_ip,
            attest_rate,
            attest_burst,
            log_level
        );
        if let Some(format) = flags.log_format.or(file.log_format) {
            config.log_format = format
                .parse()
                .map_err(|reason| ConfigError::Invalid { key: "log_format", reason })?;
        }
        config.metrics_addr = flags.metrics_addr.or(file.metrics_addr);
        set_vec(&mut config.admin_uids, flags.admin_uids.or(file.admin_uids));
        set_vec(&mut config.admin_gids, flags.admin_gids.or(file.admin_gids));
        config.admin_socket = match flags.admin_socket.or(file.admin_socket) {
            Some(path) => path,
            None => default_admin_socket(
                &config.data_dir,
                !config.admin_uids.is_empty() || !config.admin_gids.is_empty(),
                rustix::process::geteuid().as_raw(),
            ),
        };
        if let Some(on) = flags.events.or(file.events) {
            config.events.enabled = on;
        }
        if let Some(secs) = flags.event_retention.or(file.event_retention) {
            config.events.retention_secs = secs;
        }
        config.events.file = flags.event_file.or(file.event_file);
        if let Some(n) = flags.anomaly_refusals_per_minute.or(file.anomaly_refusals_per_minute) {
            config.events.refusals_per_minute = n;
        }
        if let Some(policy) = flags.approval.or(file.approval) {
            policy.validate().map_err(|reason| ConfigError::Invalid { key: "approval", reason })?;
            config.approval = policy;
        }
        if let Some(broker) = flags.broker.or(file.broker) {
            config.broker = Some(
                broker.resolve().map_err(|(key, reason)| ConfigError::Invalid { key, reason })?,
            );
        }
        if let Some(kind) = flags.jwt_key_type.or(file.jwt_key_type) {
            config.jwt_key_type = kind
                .parse()
                .map_err(|reason| ConfigError::Invalid { key: "jwt_key_type", reason })?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Seconds a proposal waits for approval.
    pub fn pending_ttl(&self) -> u32 {
        self.approval.pending_ttl.unwrap_or(crate::policy::governance::DEFAULT_PENDING_TTL)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| Err(ConfigError::Invalid { key, reason: reason.into() });
        if self.ca_ttl < 10 {
            return invalid("ca_ttl", "must be at least 10 seconds");
        }
        if !(self.ca_prepare_at > 0.0 && self.ca_prepare_at < self.ca_activate_at) {
            return invalid("ca_prepare_at", "must be > 0 and below ca_activate_at");
        }
        if self.ca_activate_at >= 1.0 {
            return invalid("ca_activate_at", "must be below 1");
        }
        if self.max_x509_svid_ttl == 0 {
            return invalid("max_x509_svid_ttl", "must be at least 1 second");
        }
        if self.default_x509_svid_ttl == 0 || self.default_x509_svid_ttl > self.max_x509_svid_ttl {
            return invalid("default_x509_svid_ttl", "must be between 1 and max_x509_svid_ttl");
        }
        if self.max_jwt_svid_ttl == 0 {
            return invalid("max_jwt_svid_ttl", "must be at least 1 second");
        }
        if self.default_jwt_svid_ttl == 0 || self.default_jwt_svid_ttl > self.max_jwt_svid_ttl {
            return invalid("default_jwt_svid_ttl", "must be between 1 and max_jwt_svid_ttl");
        }
        if self.agent_svid_ttl < 2 {
            return invalid("agent_svid_ttl", "must be at least 2 seconds");
        }
        if self.join_token_ttl == 0 {
            return invalid("join_token_ttl", "must be at least 1 second");
        }
        if self.sign_rate == 0 || self.sign_burst < 1000 {
            return invalid(
                "sign_rate",
                "sign_rate must be at least 1 and sign_burst at least 1000 (one batch)",
            );
        }
        if self.change_log_keep == 0 {
            return invalid("change_log_keep", "must be at least 1");
        }
        if self.node_max_connections == 0 || self.node_max_unauthenticated_per_ip == 0 {
            return invalid(
                "node_max_connections",
                "node_max_connections and node_max_unauthenticated_per_ip must be at least 1",
            );
        }
        if !(self.attest_rate.is_finite() && self.attest_rate > 0.0) || self.attest_burst == 0 {
            return invalid("attest_rate", "attest_rate must be > 0 and attest_burst at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_defaults_fill_the_rest() {
        let file: FileConfig =
            toml::from_str("trust_domain = \"a.org\"\nca_ttl = 600\ndefault_x509_svid_ttl = 60\n")
                .unwrap();
        let flags = FileConfig { trust_domain: Some("b.org".into()), ..Default::default() };
        let config = Config::resolve(file, flags).unwrap();
        assert_eq!(config.trust_domain.as_str(), "b.org");
        assert_eq!(config.ca_ttl, 600);
        assert_eq!(config.default_x509_svid_ttl, 60);
        assert_eq!(config.admin_socket, PathBuf::from(DEFAULT_DATA_DIR).join("admin.sock"));
    }

    #[test]
    fn with_operators_the_default_admin_socket_is_outside_the_private_data_dir() {
        let dir = Path::new("/var/lib/tessera");
        assert_eq!(default_admin_socket(dir, false, 0), dir.join("admin.sock"));
        assert_eq!(default_admin_socket(dir, true, 0), PathBuf::from(SYSTEM_ADMIN_SOCKET));
        assert_eq!(
            default_admin_socket(dir, true, 1000),
            PathBuf::from("/var/lib/tessera-admin/admin.sock")
        );
        let file = FileConfig {
            trust_domain: Some("a.org".into()),
            admin_uids: Some(vec![4242]),
            data_dir: Some(dir.into()),
            ..Default::default()
        };
        let config = Config::resolve(file, FileConfig::default()).unwrap();
        assert!(!config.admin_socket.starts_with(dir), "{}", config.admin_socket.display());
    }

    #[test]
    fn unknown_keys_and_missing_trust_domain_are_errors() {
        assert!(toml::from_str::<FileConfig>("trust_domian = \"a.org\"").is_err());
        let err = Config::resolve(FileConfig::default(), FileConfig::default()).unwrap_err();
        assert!(matches!(err, ConfigError::MissingTrustDomain));
        let bad = FileConfig { trust_domain: Some("Bad..Domain".into()), ..Default::default() };
        assert!(matches!(
            Config::resolve(bad, FileConfig::default()),
            Err(ConfigError::TrustDomain(_))
        ));
    }

    #[test]
    fn out_of_range_settings_are_refused() {
        let refused_key = |setting: FileConfig| {
            let file = FileConfig { trust_domain: Some("a.org".into()), ..setting };
            match Config::resolve(file, FileConfig::default()) {
                Err(ConfigError::Invalid { key, .. }) => key,
                other => panic!("not refused as out of range: {other:?}"),
            }
        };
        let ttl = FileConfig { default_x509_svid_ttl: Some(0), ..Default::default() };
        assert_eq!(refused_key(ttl), "default_x509_svid_ttl");
        let keep = FileConfig { change_log_keep: Some(0), ..Default::default() };
        assert_eq!(refused_key(keep), "change_log_keep");
    }
}
