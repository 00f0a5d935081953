//! A server's `[broker]` for tests and `tessera-bench broker`: an operator
//! certificate for 127.0.0.1 signed by a test CA, the example policies of
//! `examples/broker/`, and a small HTTPS client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tessera_server::broker::config::BrokerFileConfig;

/// The workspace's root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// The Python with the broker tests' clients (py-spiffe, PyJWT, requests):
/// `TESSERA_PYTHON`, else `scripts/test.sh`'s `target/py-venv`. `None`
/// when it is missing and `TESSERA_SKIP_PYTHON=1` (the test then says it
/// skipped); a panic when it is missing otherwise.
pub fn python() -> Option<PathBuf> {
    let python = std::env::var_os("TESSERA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/py-venv/bin/python"));
    let ok = std::process::Command::new(&python)
        .args(["-c", "import spiffe, jwt, requests"])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    if std::env::var("TESSERA_SKIP_PYTHON").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: no Python with py-spiffe, PyJWT and requests at {}", python.display());
        return None;
    }
    panic!(
        "no Python with py-spiffe, PyJWT and requests at {}: run scripts/test.sh (it creates \
         target/py-venv), set TESSERA_PYTHON, or set TESSERA_SKIP_PYTHON=1 to skip",
        python.display()
    );
}

/// A free loopback port (the issuer URL names it before the server binds).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem).
pub fn operator_certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "broker test CA");
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
    leaf.distinguished_name.push(rcgen::DnType::CommonName, "broker");
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let paths = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    (paths.0, paths.1, paths.2)
}

pub fn broker_config(dir: &Path, port: u16) -> BrokerFileConfig {
    broker_config_for(dir, port, &format!("https://127.0.0.1:{port}"))
}

/// [`broker_config`] with another issuer URL (several servers behind one name).
pub fn broker_config_for(dir: &Path, port: u16, issuer: &str) -> BrokerFileConfig {
    let (_, cert, key) = operator_certificate(dir);
    let examples = workspace().join("examples/broker");
    BrokerFileConfig {
        bind: SocketAddr::from(([127, 0, 0, 1], port)),
        issuer: issuer.to_string(),
        tls_cert: Some(cert),
        tls_key: Some(key),
        policy_dir: examples.join("policies"),
        resources: Some(examples.join("resources.toml")),
        token_ttl: None,
        task_ttl: None,
        max_task_ttl: None,
        approval_ttl: None,
        poll_interval: Some(1),
        approval_above: None,
        key_rotation: None,
        authorization_details_types: None,
        blast_radius: None,
        jwt_svid_path: Some("/svid".into()),
    }
}

/// An HTTPS/1.1 connection to the broker, trusting `dir/ca.pem`, with an
/// optional client certificate (chain, PKCS#8 key).
pub struct Https {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl std::fmt::Debug for Https {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Https")
    }
}

impl Https {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr, ca_pem: &Path) -> Self {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca_pem).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls =
            tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        Self { sender }
    }

    /// GETs `path`; the status and the JSON answer.
    pub async fn get(&mut self, path: &str) -> (u16, serde_json::Value) {
        let request = hyper::Request::get(path)
            .header("host", "127.0.0.1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.sender.ready().await.unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    /// POSTs a form; the status and the JSON answer.
    pub async fn post_form(
        &mut self,
        path: &str,
        fields: &[(&str, &str)],
        bearer: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let body: String = form_urlencoded_pairs(fields);
        let mut request = hyper::Request::post(path)
            .header("host", "127.0.0.1")
            .header("content-type", "application/x-www-form-urlencoded");
        if let Some(token) = bearer {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(Full::new(Bytes::from(body))).unwrap();
        self.sender.ready().await.unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }
}

fn form_urlencoded_pairs(fields: &[(&str, &str)]) -> String {
    fields.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&")
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
