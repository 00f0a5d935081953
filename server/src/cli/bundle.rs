//! `bundle show`: the trust bundle and CRLs.

use clap::{Subcommand, ValueEnum};
use tessera_proto::admin as pb;

use super::args::{connect, SocketArg};
use crate::cli_support::CliError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum BundleFormat {
    Pem,
    Der,
    /// The SPIFFE bundle: a JWK Set with the CA certificates (x509-svid)
    /// and the JWT keys (jwt-svid), for federation partners.
    Spiffe,
}

#[derive(Debug, Subcommand)]
pub(super) enum BundleCommand {
    /// Print the trust domain's CA certificates (or, with --crl, its CRLs).
    Show {
        /// Output format.
        #[arg(long, value_enum, default_value = "pem")]
        format: BundleFormat,
        /// Print the CRLs (one per CA) instead of the certificates.
        #[arg(long)]
        crl: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
}

/// The SPIFFE bundle document (a JWK Set) of the admin API's bundle.
pub(super) fn spiffe_bundle(bundle: &pb::Bundle) -> Result<String, CliError> {
    use tessera_workload_api::jwt::{spiffe_bundle_document, JwtBundle, JwtKey};
    let trust_domain = tessera_workload_api::TrustDomain::new(&bundle.trust_domain)
        .map_err(|e| CliError(format!("server sent a bad trust domain: {e}")))?;
    let keys = bundle
        .jwt_authorities
        .iter()
        .map(|k| JwtKey::from_spki_der(&k.kid, &k.public_key))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CliError(format!("server sent a bad JWT key: {e}")))?;
    let document = spiffe_bundle_document(
        &bundle.authorities,
        &JwtBundle::new(trust_domain, keys),
        bundle.sequence,
        bundle.refresh_hint,
    )
    .map_err(|e| CliError(format!("cannot build the SPIFFE bundle: {e}")))?;
    serde_json::to_string_pretty(&document).map_err(|e| CliError(e.to_string()))
}

pub(super) async fn bundle_command(command: BundleCommand) -> Result<(), CliError> {
    let BundleCommand::Show { format, crl, socket } = command;
    let mut client = connect(&socket).await?;
    let bundle = client.get_bundle(pb::GetBundleRequest {}).await?.into_inner();
    if format == BundleFormat::Spiffe {
        if crl {
            return Err(CliError("--crl has no SPIFFE format; use pem or der".into()));
        }
        crate::outln!("{}", spiffe_bundle(&bundle)?);
        return Ok(());
    }
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let (tag, items) =
        if crl { ("X509 CRL", &bundle.crls) } else { ("CERTIFICATE", &bundle.authorities) };
    for cert in items {
        match format {
            BundleFormat::Pem => {
                let block = pem::Pem::new(tag, cert.clone());
                let _ = write!(out, "{}", pem::encode(&block));
            }
            BundleFormat::Der | BundleFormat::Spiffe => {
                let _ = out.write_all(cert);
            }
        }
    }
    Ok(())
}
