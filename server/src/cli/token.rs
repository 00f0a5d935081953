//! `token generate`: join tokens for node attestation.

use clap::Subcommand;
use tessera_proto::admin as pb;

use super::args::{connect, SocketArg};
use crate::cli_support::CliError;

#[derive(Debug, Subcommand)]
pub(super) enum TokenCommand {
    /// Generate a single-use join token; prints the token.
    Generate {
        /// SPIFFE ID the attesting agent receives [default: spiffe://<td>/tessera/agent/join_token/<token>].
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Lifetime in seconds [default: server's join_token_ttl, 600].
        #[arg(long)]
        ttl: Option<u32>,
        #[command(flatten)]
        socket: SocketArg,
    },
}

pub(super) async fn token_command(command: TokenCommand) -> Result<(), CliError> {
    let TokenCommand::Generate { spiffe_id, ttl, socket } = command;
    if ttl == Some(0) {
        return Err(CliError("--ttl must be at least 1 second".into()));
    }
    let mut client = connect(&socket).await?;
    let request = pb::CreateJoinTokenRequest {
        ttl: ttl.unwrap_or(0),
        spiffe_id: spiffe_id.unwrap_or_default(),
    };
    let token = client.create_join_token(request).await?.into_inner();
    crate::outln!("{}", token.token);
    eprintln!("agent SPIFFE ID: {}", token.spiffe_id);
    if let Some(p) = &token.pending {
        eprintln!(
            "This token is held for approval ({}): it works once another operator runs `tessera-server entry approve --id {} --hash {}`",
            p.reasons.join("; "),
            p.proposal_id,
            p.content_hash
        );
    }
    Ok(())
}
