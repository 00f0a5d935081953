//! `x509 mint` and `jwt mint`: SVIDs for identities outside a node. For an
//! X509-SVID the key is generated here and only a CSR is sent: the key
//! never leaves this process (printed, or written 0600 with --write).

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;
use tessera_proto::admin as pb;

use super::args::{connect, json_time, parse_duration, SocketArg};
use crate::cli_support::{format_time, CliError};

#[derive(Debug, Subcommand)]
pub(super) enum X509Command {
    /// Mint an X509-SVID (SPIRE's `x509 mint`): recorded as issued by your
    /// uid and revocable with `svid revoke --serial`. Refused for an
    /// identity the approval policy protects.
    Mint {
        /// The SPIFFE ID of the SVID.
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime, e.g. 1h or 3600 [default: the server's X509-SVID TTL].
        #[arg(long)]
        ttl: Option<String>,
        /// A DNS SAN (repeatable).
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// Write svid.pem, svid.key (0600) and bundle.pem into this
        /// directory instead of printing them.
        #[arg(long)]
        write: Option<PathBuf>,
        /// Print JSON (certificates and key as PEM).
        #[arg(long, conflicts_with = "write")]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum JwtCommand {
    /// Mint a JWT-SVID (SPIRE's `jwt mint`): recorded with its jti as issued
    /// by your uid and revocable with `svid revoke --jti`. Refused for an
    /// identity or audience the approval policy protects.
    Mint {
        /// The SPIFFE ID (the token's `sub`).
        #[arg(long)]
        spiffe_id: String,
        /// An audience (repeatable; at least one).
        #[arg(long = "audience")]
        audience: Vec<String>,
        /// Lifetime, e.g. 5m or 300 [default: the server's JWT-SVID TTL].
        #[arg(long)]
        ttl: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
}

/// A `--ttl` in seconds, 0 for the server's default.
fn ttl_secs(ttl: Option<&str>) -> Result<u32, CliError> {
    let Some(ttl) = ttl else { return Ok(0) };
    match parse_duration("--ttl", ttl)? {
        0 => Err(CliError("--ttl must be at least 1 second".into())),
        secs => u32::try_from(secs).map_err(|_| CliError(format!("--ttl {ttl} is too long"))),
    }
}

fn pem_all(tag: &str, items: &[Vec<u8>]) -> String {
    items.iter().map(|der| pem::encode(&pem::Pem::new(tag, der.clone()))).collect()
}

pub(super) async fn x509_command(command: X509Command) -> Result<(), CliError> {
    let X509Command::Mint { spiffe_id, ttl, dns_names, write, json, socket } = command;
    let ttl = ttl_secs(ttl.as_deref())?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CliError(format!("cannot generate a key: {e}")))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| CliError(format!("cannot make a CSR: {e}")))?
        .der()
        .to_vec();
    let mut client = connect(&socket).await?;
    let request = pb::MintX509SvidRequest { spiffe_id: spiffe_id.clone(), csr, ttl, dns_names };
    let svid = client.mint_x509_svid(request).await?.into_inner();
    let (chain, key_pem, bundle) = (
        pem_all("CERTIFICATE", &svid.x509_svid),
        key.serialize_pem(),
        pem_all("CERTIFICATE", &svid.bundle),
    );
    if let Some(dir) = write {
        crate::fsutil::create_private_dir(&dir)
            .map_err(|e| CliError(format!("cannot create {}: {e}", dir.display())))?;
        for (name, data) in [("svid.key", &key_pem), ("svid.pem", &chain), ("bundle.pem", &bundle)]
        {
            let path = dir.join(name);
            crate::fsutil::write_private(&path, data.as_bytes())
                .map_err(|e| CliError(format!("cannot write {}: {e}", path.display())))?;
        }
        crate::outln!(
            "Minted X509-SVID {} for {spiffe_id} until {}; wrote svid.pem, svid.key, bundle.pem to {}",
            svid.serial,
            format_time(svid.expires_at),
            dir.display()
        );
        return Ok(());
    }
    if json {
        let value = json!({
            "spiffe_id": spiffe_id,
            "serial": svid.serial,
            "expires_at": json_time(svid.expires_at),
            "expires_at_unix": svid.expires_at,
            "x509_svid": chain,
            "private_key": key_pem,
            "bundle": bundle,
        });
        crate::outln!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
        return Ok(());
    }
    crate::outln!("SPIFFE ID     : {spiffe_id}");
    crate::outln!("Serial number : {}", svid.serial);
    crate::outln!("Expires at    : {}", format_time(svid.expires_at));
    crate::outln!();
    crate::outln!("X509-SVID:\n{chain}");
    crate::outln!("Private key:\n{key_pem}");
    crate::outln!("Root CAs:\n{bundle}");
    Ok(())
}

pub(super) async fn jwt_command(command: JwtCommand) -> Result<(), CliError> {
    let JwtCommand::Mint { spiffe_id, audience, ttl, json, socket } = command;
    if audience.is_empty() {
        return Err(CliError("at least one --audience is required".into()));
    }
    let ttl = ttl_secs(ttl.as_deref())?;
    let mut client = connect(&socket).await?;
    let request =
        pb::MintJwtSvidRequest { spiffe_id: spiffe_id.clone(), audience: audience.clone(), ttl };
    let jwt = client.mint_jwt_svid(request).await?.into_inner();
    if json {
        let value = json!({
            "spiffe_id": spiffe_id,
            "audience": audience,
            "jti": jwt.jti,
            "expires_at": json_time(jwt.expires_at),
            "expires_at_unix": jwt.expires_at,
            "token": jwt.token,
        });
        crate::outln!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
        return Ok(());
    }
    crate::outln!("{}", jwt.token);
    eprintln!("jti {} for {spiffe_id}, until {}", jwt.jti, format_time(jwt.expires_at));
    Ok(())
}
