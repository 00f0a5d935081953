//! TLS to PostgreSQL with libpq's `sslmode` semantics, on rustls (ring).
//!
//! tokio-postgres parses `sslmode` itself only for `disable`, `prefer` and
//! `require`, and knows neither `verify-ca`, `verify-full` nor
//! `sslrootcert`. [`split_params`] takes those two parameters out of the
//! datastore URL (the `postgres://` form and the `key=value` form alike)
//! before the rest goes to tokio-postgres; [`SslMode::resolve`] decides the
//! mode in force and [`connector`] builds the rustls client it asks for:
//!
//! | sslmode | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` | when the server offers TLS | no |
//! | `require` | always | no (with `sslrootcert`, as `verify-ca`: libpq does the same) |
//! | `verify-ca` | always | chains to `sslrootcert` (or the system's roots); any host name |
//! | `verify-full` | always | chains as above, and names the host connected to |
//! | absent | `verify-full` for a remote host; `disable` when every host is a Unix socket, `localhost`, `127.0.0.1` or `::1` | |
//!
//! `sslrootcert=system` (libpq 16) or no `sslrootcert` with `verify-*`
//! uses the system's trust store (`rustls-native-certs`: the OpenSSL
//! locations, `SSL_CERT_FILE`/`SSL_CERT_DIR`). A Unix socket never carries
//! TLS (libpq ignores `sslmode` there too). Client certificates
//! (`sslcert`, `sslkey`) are not supported.

use std::net::IpAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::Host;
use tokio_postgres_rustls::MakeRustlsConnect;

/// A datastore URL's TLS settings that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// `sslmode` is none of the values libpq knows.
    #[error("unknown sslmode {0:?}: use disable, prefer, require, verify-ca or verify-full")]
    UnknownSslMode(String),
    /// `sslmode=allow` (plain first, TLS if refused): tokio-postgres cannot.
    #[error("sslmode=allow is not supported: use prefer, require, verify-ca or verify-full")]
    AllowUnsupported,
    /// `sslmode` or `sslrootcert` appears twice.
    #[error("{0} is given twice")]
    Repeated(&'static str),
    /// A parameter is not `key=value`, is badly percent-encoded or quoted.
    #[error("malformed connection parameter {0:?}")]
    Malformed(String),
    /// The `sslrootcert` file cannot be read or holds no usable certificate.
    #[error("sslrootcert {path}: {reason}")]
    RootCert {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// `verify-*` without `sslrootcert`, and the system has no trust roots.
    #[error(
        "sslmode={mode} needs trusted roots: no sslrootcert given and the system store has none ({reason}); set sslrootcert=PATH"
    )]
    NoSystemRoots {
        /// The mode asked for.
        mode: SslMode,
        /// What loading the system store said.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// libpq's `sslmode` values that tokio-postgres can follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain.
    Disable,
    /// TLS when the server offers it, certificate not checked.
    Prefer,
    /// TLS, certificate not checked.
    Require,
    /// TLS, certificate chains to a trusted root; any host name.
    VerifyCa,
    /// TLS, certificate chains to a trusted root and names the host.
    VerifyFull,
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

impl std::str::FromStr for SslMode {
    type Err = TlsConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => return Err(TlsConfigError::AllowUnsupported),
            other => return Err(TlsConfigError::UnknownSslMode(other.to_string())),
        })
    }
}

/// The TLS parameters of a datastore URL.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TlsParams {
    /// `sslmode`, as written.
    pub sslmode: Option<String>,
    /// `sslrootcert`: a PEM file of trusted CA certificates, or `system`.
    pub sslrootcert: Option<String>,
}

impl SslMode {
    /// The mode in force for `params` on `config`: the URL's, or the
    /// default (verify-full for a remote host, disable for a local one).
    /// `require` with `sslrootcert` is `verify-ca`; only Unix sockets: disable.
    pub fn resolve(
        params: &TlsParams,
        config: &tokio_postgres::Config,
    ) -> Result<SslMode, TlsConfigError> {
        let asked = params.sslmode.as_deref().map(str::parse).transpose()?;
        let hosts = config.get_hosts();
        if !hosts.is_empty() && hosts.iter().all(|h| matches!(h, Host::Unix(_))) {
            return Ok(SslMode::Disable);
        }
        Ok(match asked {
            Some(SslMode::Require) if params.sslrootcert.is_some() => SslMode::VerifyCa,
            Some(mode) => mode,
            None if is_local(config) => SslMode::Disable,
            None => SslMode::VerifyFull,
        })
    }

    /// What tokio-postgres is told: whether to ask for TLS and insist on it
    /// (the certificate checks are the connector's).
    pub fn driver_mode(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }
}

/// Whether every host `config` names is this machine: a Unix socket,
/// `localhost`, or a loopback address (a `hostaddr` included).
pub fn is_local(config: &tokio_postgres::Config) -> bool {
    let hosts_local = config.get_hosts().iter().all(|host| match host {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            let name = name.trim_start_matches('[').trim_end_matches(']');
            name.eq_ignore_ascii_case("localhost")
                || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
    });
    hosts_local && config.get_hostaddrs().iter().all(IpAddr::is_loopback)
}

/// Takes `sslmode` and `sslrootcert` out of `url`; returns the rest (for
/// tokio-postgres) and them.
pub fn split_params(url: &str) -> Result<(String, TlsParams), TlsConfigError> {
    let mut params = TlsParams::default();
    let mut take = |key: &str, value: String| -> Result<bool, TlsConfigError> {
        let slot = match key {
            "sslmode" => (&mut params.sslmode, "sslmode"),
            "sslrootcert" => (&mut params.sslrootcert, "sslrootcert"),
            _ => return Ok(false),
        };
        if slot.0.replace(value).is_some() {
            return Err(TlsConfigError::Repeated(slot.1));
        }
        Ok(true)
    };
    if is_url(url) {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), params));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) =
                pair.split_once('=').ok_or_else(|| TlsConfigError::Malformed(pair.to_string()))?;
            let key = percent_decode(key)?;
            if !take(&key, percent_decode(value)?)? {
                kept.push(pair);
            }
        }
        let rest =
            if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
        return Ok((rest, params));
    }
    let mut rest = String::new();
    let mut copied = 0;
    for pair in conninfo_pairs(url)? {
        if take(&pair.key, pair.value)? {
            rest.push_str(&url[copied..pair.start]);
            copied = pair.end;
        }
    }
    rest.push_str(&url[copied..]);
    Ok((rest.trim().to_string(), params))
}

/// Whether `url` is the URI form (else the `key=value` form).
pub fn is_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// One `key=value` of the `key=value` form, with its place in the string.
#[derive(Debug)]
pub struct Pair {
    /// The key.
    pub key: String,
    /// The value, unquoted and unescaped.
    pub value: String,
    /// Where the pair starts (its key) and ends (after its value), in bytes.
    pub start: usize,
    /// See `start`.
    pub end: usize,
    /// Where the value, as written, starts.
    pub value_start: usize,
}

/// The pairs of a libpq `key=value` string (`key = 'quoted \' value'`).
pub fn conninfo_pairs(s: &str) -> Result<Vec<Pair>, TlsConfigError> {
    let bytes = s.as_bytes();
    let mut pairs = Vec::new();
    let mut i = 0;
    let skip_space = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_space(i);
        if i >= bytes.len() {
            return Ok(pairs);
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = s[start..i].to_string();
        i = skip_space(i);
        if bytes.get(i) != Some(&b'=') {
            return Err(TlsConfigError::Malformed(key));
        }
        i = skip_space(i + 1);
        let value_start = i;
        let mut value = Vec::new();
        if bytes.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return Err(TlsConfigError::Malformed(key)),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < bytes.len() => {
                        value.push(bytes[i + 1]);
                        i += 2;
                    }
                    Some(&b) => {
                        value.push(b);
                        i += 1;
                    }
                }
            }
        } else {
            while let Some(&b) = bytes.get(i) {
                if b.is_ascii_whitespace() {
                    break;
                }
                if b == b'\\' && i + 1 < bytes.len() {
                    value.push(bytes[i + 1]);
                    i += 2;
                } else {
                    value.push(b);
                    i += 1;
                }
            }
        }
        let value = String::from_utf8(value).map_err(|_| TlsConfigError::Malformed(key.clone()))?;
        pairs.push(Pair { key, value, start, end: i, value_start });
    }
}

fn percent_decode(s: &str) -> Result<String, TlsConfigError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(|| TlsConfigError::Malformed(s.into()))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| TlsConfigError::Malformed(s.into()))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| TlsConfigError::Malformed(s.into()))
}

/// The connector for `mode`, trusting `sslrootcert` (a PEM file, or
/// `system`) or, for `verify-*` without it, the system's roots.
pub fn connector(
    mode: SslMode,
    sslrootcert: Option<&str>,
) -> Result<MakeRustlsConnect, TlsConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsConfigError::Rustls(e.to_string()))?;
    let config = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LibpqCheck { roots: None, provider }))
            .with_no_client_auth(),
        SslMode::VerifyCa => {
            let roots = Arc::new(roots(mode, sslrootcert)?);
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(LibpqCheck {
                    roots: Some(roots),
                    provider,
                }))
                .with_no_client_auth()
        }
        SslMode::VerifyFull => {
            let roots = Arc::new(roots(mode, sslrootcert)?);
            let verifier =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| TlsConfigError::Rustls(e.to_string()))?;
            builder.with_webpki_verifier(verifier).with_no_client_auth()
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

/// The trusted roots: the `sslrootcert` file's certificates, or the system's.
fn roots(mode: SslMode, sslrootcert: Option<&str>) -> Result<RootCertStore, TlsConfigError> {
    let mut store = RootCertStore::empty();
    match sslrootcert {
        Some(path) if path != "system" => {
            let failed =
                |reason: String| TlsConfigError::RootCert { path: path.to_string(), reason };
            let text = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
            let blocks = pem::parse_many(&text).map_err(|e| failed(e.to_string()))?;
            for block in blocks.iter().filter(|b| b.tag() == "CERTIFICATE") {
                store
                    .add(CertificateDer::from(block.contents().to_vec()))
                    .map_err(|e| failed(e.to_string()))?;
            }
            if store.is_empty() {
                return Err(failed("no PEM certificate in it".into()));
            }
        }
        _ => {
            let loaded = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(loaded.certs);
            if added == 0 {
                let reason = match loaded.errors.first() {
                    Some(e) => e.to_string(),
                    None => "no certificates found".into(),
                };
                return Err(TlsConfigError::NoSystemRoots { mode, reason });
            }
        }
    }
    Ok(store)
}

/// What `prefer`/`require` and `verify-ca` check, which rustls's own
/// verifier (chain and host name: `verify-full`) does not cover:
/// - no `roots` (`prefer`/`require`): encryption without authentication, as
///   in libpq;
/// - `roots` (`verify-ca`): the certificate must chain to one of them and be
///   valid now; its names are not checked.
///
/// The handshake's signature is checked against the certificate's key in
/// both.
#[derive(Debug)]
struct LibpqCheck {
    roots: Option<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for LibpqCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_leave_both_url_forms() {
        let (rest, p) = split_params(
            "postgres://u:pw@db.example.com:5432/t?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:pw@db.example.com:5432/t?application_name=x");
        assert_eq!(p.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(p.sslrootcert.as_deref(), Some("/etc/ca.pem"));

        let (rest, p) = split_params("postgres://u@h/t?sslmode=require").unwrap();
        assert_eq!((rest.as_str(), p.sslmode.as_deref()), ("postgres://u@h/t", Some("require")));

        let (rest, p) = split_params(
            "host=db.example.com sslmode = verify-ca user=u sslrootcert='/a dir/ca.pem' dbname=t",
        )
        .unwrap();
        assert_eq!(rest, "host=db.example.com  user=u  dbname=t");
        assert_eq!(p.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(p.sslrootcert.as_deref(), Some("/a dir/ca.pem"));
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_dbname(), Some("t"));

        assert!(matches!(
            split_params("postgres://h/t?sslmode=require&sslmode=disable"),
            Err(TlsConfigError::Repeated("sslmode"))
        ));
        assert!(matches!(split_params("host='h"), Err(TlsConfigError::Malformed(_))));
    }

    #[test]
    fn an_unknown_sslmode_is_a_one_line_error() {
        let e = "verify_full".parse::<SslMode>().unwrap_err().to_string();
        assert_eq!(
            e,
            "unknown sslmode \"verify_full\": use disable, prefer, require, verify-ca or verify-full"
        );
        assert!("allow".parse::<SslMode>().unwrap_err().to_string().contains("not supported"));
    }

    #[test]
    fn without_sslmode_remote_hosts_are_verified_and_local_ones_are_not() {
        let mode = |url: &str| {
            let (rest, params) = split_params(url).unwrap();
            SslMode::resolve(&params, &rest.parse().unwrap()).unwrap()
        };
        assert_eq!(mode("postgres://u@db.example.com/t"), SslMode::VerifyFull);
        assert_eq!(mode("postgres://u@10.0.0.5/t"), SslMode::VerifyFull);
        assert_eq!(mode("postgres://u@localhost/t?hostaddr=10.0.0.5"), SslMode::VerifyFull);
        assert_eq!(mode("postgres://u@localhost,db.example.com/t"), SslMode::VerifyFull);
        assert_eq!(mode("postgres://u@localhost/t"), SslMode::Disable);
        assert_eq!(mode("postgres://u@127.0.0.1:5433/t"), SslMode::Disable);
        assert_eq!(mode("postgres://u@[::1]:5433/t"), SslMode::Disable);
        assert_eq!(mode("postgres://u@%2Fvar%2Frun%2Fpostgresql/t"), SslMode::Disable);
        assert_eq!(mode("host=/tmp user=u sslmode=verify-full"), SslMode::Disable);
        assert_eq!(mode("postgres://u@db.example.com/t?sslmode=disable"), SslMode::Disable);
        assert_eq!(mode("postgres://u@localhost/t?sslmode=require"), SslMode::Require);
        assert_eq!(
            mode("postgres://u@localhost/t?sslmode=require&sslrootcert=/ca.pem"),
            SslMode::VerifyCa
        );
    }
}
