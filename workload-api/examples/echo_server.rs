//! An mTLS echo server that takes its identity from the SPIFFE Workload API
//! (`SPIFFE_ENDPOINT_SOCKET`) and accepts only the SPIFFE IDs it is told to.
//!
//! ```sh
//! echo_server --listen 127.0.0.1:7443 --allow spiffe://example.org/client
//! ```

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tessera_workload_api::{peer_spiffe_id, server_config, Authorize, SpiffeId, X509Source};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Parser)]
struct Args {
    /// Which of this workload's SVIDs to present [default: the first].
    #[arg(long)]
    spiffe_id: Option<SpiffeId>,
    /// Address to listen on (port 0 picks one; the bound address is printed).
    #[arg(long)]
    listen: String,
    /// SPIFFE ID allowed to connect (repeatable).
    #[arg(long = "allow", required = true)]
    allow: Vec<SpiffeId>,
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
        server_config(&source, Authorize::one_of(args.allow)).map_err(|e| e.to_string())?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let me = source.svid().map(|s| s.spiffe_id().to_string()).unwrap_or_default();
    println!("listening on {local} as {me}");
    loop {
        let (tcp, remote) = listener.accept().await.map_err(|e| e.to_string())?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let mut tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => {
                    eprintln!("refused {remote}: {e}");
                    return;
                }
            };
            let peer = peer_spiffe_id(tls.get_ref().1).map(|id| id.to_string()).unwrap_or_default();
            println!("accepted {peer} from {remote}");
            let (read, mut write) = tokio::io::split(&mut tls);
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if write.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}
