use super::*;

#[test]
fn passwords_are_hidden_in_messages() {
    assert_eq!(redact("postgres://u:pw@h:5/db"), "postgres://u:***@h:5/db");
    assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    assert_eq!(redact("host=/tmp user=u"), "host=/tmp user=u");
    assert_eq!(
        redact("postgres://u:pw@h/db?sslmode=verify-full&password=secret"),
        "postgres://u:***@h/db?sslmode=verify-full&password=***"
    );
    assert_eq!(redact("host=h password='s e\\'cret' user=u"), "host=h password=*** user=u");
    assert_eq!(redact("host=h password='unterminated"), "(a malformed datastore setting)");
}

/// PostgreSQL answers the COMMIT of a transaction that an earlier
/// statement aborted with the tag ROLLBACK and no error: the store's
/// commit must say so, not report a write that never happened.
#[test]
fn a_commit_that_postgresql_turned_into_a_rollback_is_an_error() {
    let kv = PgKv::connect(&crate::pg_cluster::PgCluster::shared().database()).unwrap();
    let (config, tls) = (kv.config.clone(), kv.tls.clone());
    let committed = kv
        .run(async move {
            let conn = Conn::open(&config, tls).await?;
            conn.client.batch_execute("BEGIN").await.map_err(db_err)?;
            conn.write(vec![Op::Put("t", b"k".to_vec(), b"v".to_vec())]).await?;
            // A statement fails and its error is lost on the way: the
            // transaction is aborted, and nothing says so any more.
            assert!(conn.client.batch_execute("SELECT 1/0").await.is_err());
            Ok(commit(&conn.client, None).await)
        })
        .unwrap();
    let error = committed.expect_err("a rolled-back commit reported success").to_string();
    assert!(error.contains("rolled back, not committed"), "{error}");
    assert_eq!(Kv::get(&kv, "t", b"k").unwrap(), None, "nothing was written");
}

/// The same through the store's transactions: a read that failed on the
/// server (its error ignored by the caller) aborts the transaction, and
/// the transaction then fails instead of reporting a commit.
#[test]
fn a_transaction_with_an_ignored_failed_read_does_not_report_a_commit() {
    let kv = PgKv::connect(&crate::pg_cluster::PgCluster::shared().database()).unwrap();
    let out = kv.transaction(Lock::Store, &mut |tx| {
        // A NUL byte is not text to PostgreSQL: the server refuses the read.
        assert!(tx.get("t\0", b"k").is_err());
        Ok(())
    });
    let error = out.expect_err("an aborted transaction reported a commit").to_string();
    assert!(error.contains("rolled back, not committed"), "{error}");
    // The store goes on: the next transaction commits.
    kv.transaction(Lock::Store, &mut |tx| {
        tx.put("t", b"k", b"v".to_vec());
        Ok(())
    })
    .unwrap();
    assert_eq!(Kv::get(&kv, "t", b"k").unwrap(), Some(b"v".to_vec()));
}

/// A cluster that serves TLS with a certificate for `localhost` and
/// 127.0.0.1 from a CA made here, and refuses plain TCP; the CA's PEM
/// file, and another CA's.
struct TlsCluster {
    cluster: crate::pg_cluster::PgCluster,
    ca: std::path::PathBuf,
    other_ca: std::path::PathBuf,
}

fn ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let pem = params.self_signed(&key).unwrap().pem();
    (pem, rcgen::Issuer::new(params, key))
}

fn tls_cluster() -> &'static TlsCluster {
    static CLUSTER: std::sync::OnceLock<TlsCluster> = std::sync::OnceLock::new();
    CLUSTER.get_or_init(|| {
        let (ca_pem, issuer) = ca("tessera test PostgreSQL CA");
        let (other_pem, _) = ca("another CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &issuer).unwrap();
        let tls =
            crate::pg_cluster::ServerTls { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        let cluster = crate::pg_cluster::PgCluster::start_tls(&tls).unwrap();
        let ca = cluster.dir().join("ca.pem");
        let other_ca = cluster.dir().join("other-ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        std::fs::write(&other_ca, other_pem).unwrap();
        TlsCluster { cluster, ca, other_ca }
    })
}

impl TlsCluster {
    /// A new database's URL at `host`, with `query`.
    fn url(&self, host: &str, query: &str) -> String {
        let db = self.cluster.database();
        let name = db.rsplit('/').next().unwrap();
        format!("postgres://tessera@{host}:{}/{name}?{query}", self.cluster.port())
    }
}

/// Whether the store's connections are encrypted.
fn encrypted(kv: &PgKv) -> bool {
    kv.with_conn(|conn| async move {
        let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
        Ok(conn.client.query_one(sql, &[]).await.map_err(db_err)?.get(0))
    })
    .unwrap()
}

#[test]
fn sslmode_require_encrypts_without_checking_the_certificate() {
    let pg = tls_cluster();
    let kv = PgKv::connect(&pg.url("127.0.0.1", "sslmode=require")).unwrap();
    assert!(encrypted(&kv));
    kv.apply(vec![Op::Put("t", b"k".to_vec(), b"v".to_vec())]).unwrap();
    assert_eq!(Kv::get(&kv, "t", b"k").unwrap(), Some(b"v".to_vec()));
    assert!(kv.health().unwrap().contains("sslmode require"), "{}", kv.health().unwrap());
}

#[test]
fn verify_full_with_the_servers_ca_connects() {
    let pg = tls_cluster();
    for host in ["127.0.0.1", "localhost"] {
        let query = format!("sslmode=verify-full&sslrootcert={}", pg.ca.display());
        let kv = PgKv::connect(&pg.url(host, &query)).unwrap();
        assert!(encrypted(&kv), "{host}");
        kv.apply(vec![Op::Put("t", b"k".to_vec(), b"v".to_vec())]).unwrap();
    }
}

#[test]
fn verify_full_with_another_ca_is_refused_and_says_why() {
    let pg = tls_cluster();
    let query = format!("sslmode=verify-full&sslrootcert={}", pg.other_ca.display());
    let error = PgKv::connect(&pg.url("127.0.0.1", &query)).unwrap_err().to_string();
    assert!(error.contains("invalid peer certificate: UnknownIssuer"), "{error}");
    assert!(!error.contains('\n'), "{error}");
    // verify-ca checks the chain too.
    let query = format!("sslmode=verify-ca&sslrootcert={}", pg.other_ca.display());
    let error = PgKv::connect(&pg.url("127.0.0.1", &query)).unwrap_err().to_string();
    assert!(error.contains("UnknownIssuer"), "{error}");
}

#[test]
fn verify_full_refuses_a_certificate_for_another_host_name_and_verify_ca_does_not() {
    let pg = tls_cluster();
    // The name says db.example.test; the connection goes to 127.0.0.1.
    let query =
        |mode: &str| format!("hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={}", pg.ca.display());
    let error =
        PgKv::connect(&pg.url("db.example.test", &query("verify-full"))).unwrap_err().to_string();
    assert!(error.contains("certificate not valid for name \"db.example.test\""), "{error}");
    let kv = PgKv::connect(&pg.url("db.example.test", &query("verify-ca"))).unwrap();
    assert!(encrypted(&kv));
}

#[test]
fn sslmode_disable_is_refused_by_a_server_that_requires_tls() {
    let pg = tls_cluster();
    let error = PgKv::connect(&pg.url("127.0.0.1", "sslmode=disable")).unwrap_err().to_string();
    assert!(error.contains("no encryption"), "{error}");
}

/// Without sslmode a remote host is verified (against the system's
/// roots here, which do not hold the test CA), never reached in plain.
#[test]
fn a_remote_host_without_sslmode_is_verified() {
    let pg = tls_cluster();
    let error =
        PgKv::connect(&pg.url("db.example.test", "hostaddr=127.0.0.1")).unwrap_err().to_string();
    assert!(
        error.contains("invalid peer certificate: UnknownIssuer")
            || error.contains("needs trusted roots"),
        "{error}"
    );
    // With the CA named, the host name is checked too (verify-full, not verify-ca).
    let query = format!("hostaddr=127.0.0.1&sslrootcert={}", pg.ca.display());
    let error = PgKv::connect(&pg.url("db.example.test", &query)).unwrap_err().to_string();
    assert!(error.contains("certificate not valid for name"), "{error}");
}

#[test]
fn an_unknown_sslmode_or_an_unreadable_root_file_is_a_one_line_error() {
    let error = PgKv::connect("postgres://u:pw@db.example.test/t?sslmode=verify").unwrap_err();
    assert_eq!(
        error.to_string(),
        "datastore: postgres://u:***@db.example.test/t?sslmode=verify: unknown sslmode \"verify\": use disable, prefer, require, verify-ca or verify-full"
    );
    let error = PgKv::connect("postgres://u@db.example.test/t?sslrootcert=/nonexistent.pem")
        .unwrap_err()
        .to_string();
    assert!(error.contains("sslrootcert /nonexistent.pem: No such file"), "{error}");
}

/// The README's Unix socket form: the socket directory, percent-encoded, as the host.
#[test]
fn a_unix_socket_url_reaches_the_database() {
    let cluster = crate::pg_cluster::PgCluster::shared();
    let tcp = cluster.database();
    let name = tcp.rsplit('/').next().unwrap();
    let dir = cluster.dir().display().to_string().replace('/', "%2F");
    let url = format!("postgres://tessera@{dir}:{}/{name}", cluster.port());
    let kv = PgKv::connect(&url).unwrap();
    assert!(kv.health().unwrap().starts_with("postgresql"), "{url}");
}
