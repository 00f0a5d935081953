//! The `[broker]` section of the server's config file: where the broker
//! listens, the issuer it names itself by, its TLS, its policy and the
//! lifetimes of what it hands out. Checked once, at load.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::policy::BlastWeights;

/// The `[broker]` section as written (every field but the required ones defaulted).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerFileConfig {
    /// HTTPS address, e.g. `127.0.0.1:8443`.
    pub bind: SocketAddr,
    /// The issuer URL (`https://...`, no query or fragment): the `iss` of
    /// every access token, and the `aud` callers' JWT-SVIDs must carry.
    pub issuer: String,
    /// An operator certificate chain (PEM) for clients outside the trust
    /// domain; unset: the server's own X509-SVID.
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM, PKCS#8).
    pub tls_key: Option<PathBuf>,
    /// The Cedar policies (`*.cedar`) and schema (`*.cedarschema`).
    pub policy_dir: PathBuf,
    /// Attributes of tools and targets (TOML), optional.
    pub resources: Option<PathBuf>,
    /// Access token lifetime, seconds (default 300).
    pub token_ttl: Option<u32>,
    /// Default task lifetime for `task start`, seconds (default 3600).
    pub task_ttl: Option<u32>,
    /// Longest task lifetime, seconds (default 86400).
    pub max_task_ttl: Option<u32>,
    /// How long a held request waits for an operator, and an approval for
    /// its poll, seconds (default 600).
    pub approval_ttl: Option<u32>,
    /// Seconds a caller waits between polls of a held request (default 2).
    pub poll_interval: Option<u32>,
    /// A blast radius above which every permit needs approval, whatever
    /// the policies say (default: off).
    pub approval_above: Option<i64>,
    /// Seconds between rotations of the broker's signing key (default 86400).
    pub key_rotation: Option<u64>,
    /// `authorization_details` types accepted (default `["tool_access"]`).
    pub authorization_details_types: Option<Vec<String>>,
    /// Weights of the blast-radius score.
    pub blast_radius: Option<BlastWeights>,
    /// Publish an OIDC discovery document and JWKS for the trust domain's
    /// JWT-SVIDs under this path of the issuer (e.g. `/svid`): JWT-SVIDs
    /// then carry `iss` = issuer + path.
    pub jwt_svid_path: Option<String>,
}

/// The resolved `[broker]` settings.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// HTTPS address.
    pub bind: SocketAddr,
    /// Issuer URL, without a trailing `/`.
    pub issuer: String,
    /// Operator certificate and key, if any.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Policy directory.
    pub policy_dir: PathBuf,
    /// Resources file.
    pub resources: Option<PathBuf>,
    /// Access token lifetime, seconds.
    pub token_ttl: u32,
    /// Default task lifetime, seconds.
    pub task_ttl: u32,
    /// Longest task lifetime, seconds.
    pub max_task_ttl: u32,
    /// Held request / approval lifetime, seconds.
    pub approval_ttl: u32,
    /// Poll interval, seconds.
    pub poll_interval: u32,
    /// Blast radius above which approval is needed (`None`: policy alone decides).
    pub approval_above: Option<i64>,
    /// Signing key rotation period, seconds.
    pub key_rotation: u64,
    /// Accepted `authorization_details` types.
    pub detail_types: Vec<String>,
    /// Blast-radius weights.
    pub weights: BlastWeights,
    /// The JWT-SVID issuer (issuer + `jwt_svid_path`), when published.
    pub jwt_svid_issuer: Option<String>,
}

/// Longest access token lifetime the broker accepts in its config.
pub const MAX_TOKEN_TTL: u32 = 3600;

impl BrokerFileConfig {
    /// Checks the section; the error names the key.
    pub fn resolve(self) -> Result<BrokerConfig, (&'static str, String)> {
        let issuer = self.issuer.trim_end_matches('/').to_string();
        if !issuer.starts_with("https://") || issuer.len() <= "https://".len() {
            return Err(("broker.issuer", format!("{issuer:?} is not an https:// URL")));
        }
        if issuer.contains(['?', '#', ' ']) {
            return Err(("broker.issuer", "must have no query, fragment or spaces".into()));
        }
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(("broker.tls_cert", "tls_cert and tls_key go together".into())),
        };
        let token_ttl = self.token_ttl.unwrap_or(300);
        if token_ttl == 0 || token_ttl > MAX_TOKEN_TTL {
            return Err(("broker.token_ttl", format!("must be between 1 and {MAX_TOKEN_TTL}")));
        }
        let max_task_ttl = self.max_task_ttl.unwrap_or(86_400);
        let task_ttl = self.task_ttl.unwrap_or(3600);
        if max_task_ttl == 0 || task_ttl == 0 || task_ttl > max_task_ttl {
            return Err(("broker.task_ttl", "must be between 1 and max_task_ttl".into()));
        }
        let approval_ttl = self.approval_ttl.unwrap_or(600);
        if approval_ttl == 0 {
            return Err(("broker.approval_ttl", "must be at least 1 second".into()));
        }
        let poll_interval = self.poll_interval.unwrap_or(2).max(1);
        let key_rotation = self.key_rotation.unwrap_or(86_400);
        if key_rotation < 60 {
            return Err(("broker.key_rotation", "must be at least 60 seconds".into()));
        }
        let jwt_svid_issuer = match self.jwt_svid_path {
            None => None,
            Some(path) => {
                let path = path.trim_end_matches('/');
                if !path.starts_with('/') || path.len() < 2 || path.contains(['?', '#', ' ']) {
                    return Err((
                        "broker.jwt_svid_path",
                        format!("{path:?} is not a path like /svid"),
                    ));
                }
                if path.starts_with("/.well-known")
                    || ["/token", "/introspect", "/jwks"].contains(&path)
                {
                    return Err((
                        "broker.jwt_svid_path",
                        format!("{path} is one of the broker's own paths"),
                    ));
                }
                Some(format!("{issuer}{path}"))
            }
        };
        Ok(BrokerConfig {
            bind: self.bind,
            issuer,
            tls,
            policy_dir: self.policy_dir,
            resources: self.resources,
            token_ttl,
            task_ttl,
            max_task_ttl,
            approval_ttl,
            poll_interval,
            approval_above: self.approval_above,
            key_rotation,
            detail_types: self
                .authorization_details_types
                .unwrap_or_else(|| vec!["tool_access".to_string()]),
            weights: self.blast_radius.unwrap_or_default(),
            jwt_svid_issuer,
        })
    }
}

impl BrokerConfig {
    /// The path part of the issuer (`""` for `https://host:port`).
    pub fn issuer_path(&self) -> &str {
        path_of(&self.issuer)
    }

    /// The path under which JWT-SVID discovery is served, if it is.
    pub fn jwt_svid_path(&self) -> Option<&str> {
        self.jwt_svid_issuer.as_deref().map(path_of)
    }
}

fn path_of(url: &str) -> &str {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    rest.find('/').map_or("", |i| &rest[i..])
}
