//! What `tessera-agent api fetch` prints and writes: every X509-SVID in
//! SPIRE's file names (`svid.N.pem`, `svid.N.key`, `bundle.N.pem`,
//! `federated_bundle.N.M.pem`), every JWT-SVID as `jwt_svid.N.token`, and
//! which file holds which SPIFFE ID. JSON times are RFC 3339
//! (`expires_at`), with the Unix seconds beside them (`expires_at_unix`).
//! Depends on `identity` (private files) and `workload::client`.

use std::path::Path;

use crate::cli_support::{format_time, CliError};
use crate::identity::write_private;
use crate::workload::client::{FederatedBundles, FetchedSvid};

/// One X509-SVID as JSON: its certificates and the bundle as PEM (as
/// SPIRE's `-output json`); the private key only ever goes to a 0600 file
/// (`--write`), never to stdout.
pub fn svid_json(svid: &FetchedSvid) -> serde_json::Value {
    serde_json::json!({
        "spiffe_id": svid.spiffe_id,
        "serial": svid.serial,
        "expires_at": format_time(svid.expires_at),
        "expires_at_unix": svid.expires_at,
        "hint": svid.hint,
        "chain_length": svid.chain.len(),
        "x509_svid": certs_pem(&svid.chain),
        "bundle": certs_pem(&svid.bundle),
    })
}

/// One JWT-SVID as JSON (its expiry read from the token, unverified: the
/// agent just issued it).
pub fn jwt_json(spiffe_id: &str, token: &str, hint: &str) -> serde_json::Value {
    let mut out = serde_json::json!({"spiffe_id": spiffe_id, "svid": token, "hint": hint});
    let exp = tessera_workload_api::jwt::UnverifiedJwt::decode(token)
        .ok()
        .and_then(|jwt| jwt.claims.get("exp").and_then(serde_json::Value::as_i64));
    if let Some(exp) = exp {
        out["expires_at"] = format_time(exp).into();
        out["expires_at_unix"] = exp.into();
    }
    out
}

fn certs_pem(der: &[Vec<u8>]) -> String {
    der.iter().map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.clone()))).collect()
}

fn write(dir: &Path, name: &str, data: &str) -> Result<(), CliError> {
    write_private(&dir.join(name), data.as_bytes()).map_err(|e| CliError(e.to_string()))
}

fn create(dir: &Path) -> Result<(), CliError> {
    std::fs::create_dir_all(dir).map_err(|e| CliError(format!("{}: {e}", dir.display())))
}

/// Writes every SVID into `dir` (files 0600); answers, per file, which
/// SPIFFE ID (or trust domain) it holds.
pub fn write_x509(
    dir: &Path,
    svids: &[FetchedSvid],
    federated: &FederatedBundles,
) -> Result<Vec<(String, String)>, CliError> {
    create(dir)?;
    let mut written = Vec::new();
    for (i, svid) in svids.iter().enumerate() {
        let key = pem::encode(&pem::Pem::new("PRIVATE KEY", svid.key.clone()));
        write(dir, &format!("svid.{i}.key"), &key)?;
        write(dir, &format!("svid.{i}.pem"), &certs_pem(&svid.chain))?;
        write(dir, &format!("bundle.{i}.pem"), &certs_pem(&svid.bundle))?;
        for name in [format!("svid.{i}.pem"), format!("svid.{i}.key"), format!("bundle.{i}.pem")] {
            written.push((name, svid.spiffe_id.clone()));
        }
        for (j, (trust_domain, certs)) in federated.iter().enumerate() {
            let name = format!("federated_bundle.{i}.{j}.pem");
            write(dir, &name, &certs_pem(certs))?;
            written.push((name, trust_domain.clone()));
        }
    }
    Ok(written)
}

/// Writes each JWT-SVID into `dir` as `jwt_svid.N.token` (0600); answers
/// which file holds which SPIFFE ID.
pub fn write_jwt(
    dir: &Path,
    tokens: &[(String, String)],
) -> Result<Vec<(String, String)>, CliError> {
    create(dir)?;
    let mut written = Vec::new();
    for (i, (spiffe_id, token)) in tokens.iter().enumerate() {
        let name = format!("jwt_svid.{i}.token");
        write(dir, &name, &format!("{token}\n"))?;
        written.push((name, spiffe_id.clone()));
    }
    Ok(written)
}

/// Prints which file holds what, one line each; on stderr when stdout
/// carries JSON.
pub fn report_written(dir: &Path, written: &[(String, String)], json: bool) {
    for (name, what) in written {
        let line = format!("Wrote {}: {what}", dir.join(name).display());
        if json {
            eprintln!("{line}");
        } else {
            crate::outln!("{line}");
        }
    }
}
