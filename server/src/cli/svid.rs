//! `svid revoke|revoked`: issued SVIDs and their revocation.

use clap::Subcommand;
use serde_json::json;
use tessera_proto::admin as pb;

use super::args::{connect, json_time, SocketArg};
use crate::cli_support::{format_time, CliError};

#[derive(Debug, Subcommand)]
pub(super) enum SvidCommand {
    /// Revoke one SVID now. An X509-SVID (--serial): agents drop it at once
    /// and CRLs list it. A JWT-SVID (--jti): every agent's ValidateJWTSVID
    /// refuses it until it expires.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["serial", "jti"])))]
    Revoke {
        /// Serial number, hex (colons allowed).
        #[arg(long)]
        serial: Option<String>,
        /// A JWT-SVID's jti claim.
        #[arg(long)]
        jti: Option<String>,
        /// Why (recorded and logged).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// List revoked X509-SVIDs that have not expired yet.
    Revoked {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
}

pub(super) async fn svid_command(command: SvidCommand) -> Result<(), CliError> {
    match command {
        SvidCommand::Revoke { serial, jti, reason, socket } => {
            let serial = serial.map(|s| crate::revocation::normalize_serial(&s)).transpose()?;
            let mut client = connect(&socket).await?;
            let revoked = client
                .revoke_svid(pb::RevokeSvidRequest {
                    serial: serial.unwrap_or_default(),
                    jti: jti.unwrap_or_default(),
                    reason: reason.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let what = if revoked.jti.is_empty() {
                revoked.serial
            } else {
                format!("JWT-SVID {}", revoked.jti)
            };
            crate::outln!(
                "Revoked {what} ({}) until {}",
                revoked.spiffe_id,
                format_time(revoked.expires_at)
            );
            Ok(())
        }
        SvidCommand::Revoked { json, socket } => {
            let mut client = connect(&socket).await?;
            let list = client
                .list_revocations(pb::ListRevocationsRequest {})
                .await?
                .into_inner()
                .revocations;
            if json {
                let list: Vec<_> = list
                    .iter()
                    .map(|r| {
                        json!({
                            "serial": r.serial, "jti": r.jti, "spiffe_id": r.spiffe_id, "reason": r.reason,
                            "revoked_at": json_time(r.revoked_at), "expires_at": json_time(r.expires_at),
                                "expires_at_unix": r.expires_at,
                        })
                    })
                    .collect();
                crate::outln!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
            } else {
                crate::outln!(
                    "Found {}",
                    super::args::count(list.len() as u64, "revoked SVID", "revoked SVIDs")
                );
                for r in &list {
                    crate::outln!();
                    if r.jti.is_empty() {
                        crate::outln!("Serial            : {}", r.serial);
                    } else {
                        crate::outln!("JWT-SVID jti      : {}", r.jti);
                    }
                    crate::outln!("SPIFFE ID         : {}", r.spiffe_id);
                    crate::outln!("Reason            : {}", r.reason);
                    crate::outln!("Revoked at        : {}", format_time(r.revoked_at));
                    crate::outln!("Listed until      : {}", format_time(r.expires_at));
                }
            }
            Ok(())
        }
    }
}
