//! The server binary on PostgreSQL over TLS: `--datastore` with libpq's
//! `sslmode` and `sslrootcert`, against a local cluster that serves a
//! certificate made here and refuses plain connections.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use tessera_common::pg_cluster::{PgCluster, ServerTls};

use common::{RunningServer, BIN};

/// A TLS-only cluster with a certificate for localhost and 127.0.0.1, and
/// the PEM file of the CA that signed it.
fn tls_cluster() -> (PgCluster, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "test PostgreSQL CA");
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let tls = ServerTls { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
    let cluster = PgCluster::start_tls(&tls).unwrap();
    let ca_file = cluster.dir().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    (cluster, ca_file)
}

#[test]
fn a_server_runs_on_postgresql_over_verified_tls() {
    let (cluster, ca) = tls_cluster();
    let db = cluster.database();
    let name = db.rsplit('/').next().unwrap();
    // The cluster trusts its local users: the password is never asked for,
    // but must never be shown either.
    let url = format!(
        "postgres://tessera:s3cret-pw@localhost:{}/{name}?sslmode=verify-full&sslrootcert={}",
        cluster.port(),
        ca.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let server =
        RunningServer::start_logged(&dir.path().join("data"), &["--datastore", &url], &log);
    let health = server.cli(&["healthcheck"]);
    let said = String::from_utf8_lossy(&health.stdout);
    assert!(said.contains("sslmode verify-full"), "{said}");
    let out = server.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        "spiffe://example.org/node/1",
        "--selector",
        "unix:uid:1000",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list = server.cli(&["entry", "show", "--json"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("spiffe://example.org/web"));
    assert!(!said.contains("s3cret-pw"), "{said}");
    drop(server);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("sslmode=verify-full"), "{logged}");
    assert!(!logged.contains("s3cret-pw"), "the password is never logged: {logged}");
}

#[test]
fn a_bad_sslmode_stops_the_server_with_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["run", "--trust-domain", "example.org", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--datastore", "postgres://tessera:hunter2@db.example.test/t?sslmode=verify_full"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("unknown sslmode \"verify_full\""), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the password is hidden: {stderr}");
}
