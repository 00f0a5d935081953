//! An mTLS echo client that takes its identity from the SPIFFE Workload API
//! (`SPIFFE_ENDPOINT_SOCKET`), talks only to the server SPIFFE ID it is
//! told, prints the echoed text, and exits non-zero if the handshake or the
//! authorization fails.
//!
//! ```sh
//! echo_client --connect 127.0.0.1:7443 --server-id spiffe://example.org/server --message hello
//! ```

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use rustls_pki_types::ServerName;
use tessera_workload_api::{client_config, peer_spiffe_id, Authorize, SpiffeId, X509Source};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Debug, Parser)]
struct Args {
    /// Which of this workload's SVIDs to present [default: the first].
    #[arg(long)]
    spiffe_id: Option<SpiffeId>,
    /// Server address, host:port.
    #[arg(long)]
    connect: String,
    /// The server's expected SPIFFE ID.
    #[arg(long)]
    server_id: SpiffeId,
    /// Text to send.
    #[arg(long)]
    message: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let source = X509Source::from_env_as(args.spiffe_id).await.map_err(|e| e.to_string())?;
    let config =
        client_config(&source, Authorize::exact(args.server_id)).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(&args.connect)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", args.connect))?;
    // Servers are authenticated by SPIFFE ID; the name is not checked.
    let name = ServerName::try_from("echo-server").map_err(|e| e.to_string())?;
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let peer = peer_spiffe_id(tls.get_ref().1).map(|id| id.to_string()).unwrap_or_default();
    eprintln!("connected to {peer}");
    tls.write_all(format!("{}\n", args.message).as_bytes())
        .await
        .map_err(|e| format!("send failed: {e}"))?;
    let mut line = String::new();
    BufReader::new(&mut tls)
        .read_line(&mut line)
        .await
        .map_err(|e| format!("the server refused us: {e}"))?;
    if line.is_empty() {
        return Err("the server closed the connection (not authorized?)".into());
    }
    print!("{line}");
    Ok(())
}
