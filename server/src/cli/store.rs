//! `store check|backup|restore`.

use std::path::PathBuf;

use clap::Subcommand;
use tessera_proto::admin as pb;

use super::args::{connect, SocketArg};
use crate::cli_support::CliError;
use crate::config::DEFAULT_DATA_DIR;
use crate::store::{KvStore, Store, StoreError};

#[derive(Debug, Subcommand)]
pub(super) enum StoreCommand {
    /// Read every record and check indexes and watermark: through the
    /// running server, or offline with --data-dir.
    Check {
        /// Check the store in this data dir directly (server stopped).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Write a consistent backup of a running server's store (file mode 0600).
    Backup {
        /// The backup file to create.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Restore a backup into a data dir that holds no store (server stopped).
    Restore {
        /// The backup file.
        #[arg(long = "in")]
        input: PathBuf,
        /// The server's data dir [default: ./.tessera/server].
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
}

pub(super) fn print_report(report: &pb::StoreReport) {
    crate::outln!(
        "Store is whole: revision {}, write #{}, {}, {}, {}, {}.",
        report.revision,
        report.write_seq,
        super::args::count(report.entries, "entry", "entries"),
        super::args::count(report.agents, "agent", "agents"),
        super::args::count(report.issued_svids, "issued SVID", "issued SVIDs"),
        super::args::count(report.revocations, "revocation", "revocations"),
    );
}

pub(super) async fn store_command(command: StoreCommand) -> Result<(), CliError> {
    let fail = |e: &dyn std::fmt::Display| CliError(e.to_string());
    match command {
        StoreCommand::Check { data_dir: Some(dir), socket } => {
            let store = KvStore::open(&dir.join("store")).map_err(|e| match e {
                // The running server holds sled's lock: it checks its own store.
                StoreError::InUse(_) => {
                    let local = dir.join("admin.sock");
                    let online = match &socket.socket {
                        Some(path) => format!("tessera-server store check --socket {}", path.display()),
                        None if local.exists() => {
                            format!("tessera-server store check --socket {}", local.display())
                        }
                        None => "tessera-server store check --socket <the server's admin socket>".into(),
                    };
                    CliError(format!(
                        "the store in {} is in use by a running server; check it online instead: {online}",
                        dir.display()
                    ))
                }
                e => fail(&e),
            })?;
            let report = store.check().map_err(|e| fail(&e))?;
            print_report(&crate::api::admin::report_proto(&report));
            Ok(())
        }
        StoreCommand::Check { data_dir: None, socket } => {
            let mut client = connect(&socket).await?;
            let report = client.check_store(pb::CheckStoreRequest {}).await?.into_inner();
            print_report(&report);
            Ok(())
        }
        StoreCommand::Backup { out, socket } => {
            let mut client = connect(&socket).await?;
            let mut stream = client.backup_store(pb::BackupStoreRequest {}).await?.into_inner();
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.message().await? {
                bytes.extend_from_slice(&chunk.data);
            }
            crate::fsutil::write_private(&out, &bytes)
                .map_err(|e| CliError(format!("cannot write {}: {e}", out.display())))?;
            crate::outln!("Wrote a backup of {} bytes to {}", bytes.len(), out.display());
            Ok(())
        }
        StoreCommand::Restore { input, data_dir } => {
            let mut file = std::fs::File::open(&input)
                .map_err(|e| CliError(format!("cannot read {}: {e}", input.display())))?;
            crate::fsutil::create_private_dir(&data_dir)
                .map_err(|e| CliError(format!("cannot create {}: {e}", data_dir.display())))?;
            let report =
                KvStore::restore(&data_dir.join("store"), &mut file).map_err(|e| fail(&e))?;
            print_report(&crate::api::admin::report_proto(&report));
            crate::outln!("Restored {} into {}", input.display(), data_dir.display());
            Ok(())
        }
    }
}
