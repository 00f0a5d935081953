//! A private PostgreSQL cluster for tests: `initdb` in a temp dir, started
//! on a free port of 127.0.0.1 (and a Unix socket in the same dir), one
//! per test process, each test in a database of its own.
//!
//! The binaries come from the distribution's packages
//! (`/usr/lib/postgresql/<version>/bin`, installed by `scripts/test.sh`) or
//! `TESSERA_PG_BIN`. PostgreSQL refuses to run as root: as root, the
//! cluster runs as the `postgres` user the package creates.
//!
//! [`PgCluster::start_tls`] starts one that serves TLS with a given
//! certificate and key and refuses plain TCP connections (`hostssl` only
//! in `pg_hba.conf`; the Unix socket stays open for the tools).
//!
//! The cluster outlives no test process: a watchdog started with it stops
//! it (immediate shutdown) and removes its directory once the process that
//! started it has exited, however it exits.

#![allow(dead_code, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// A running cluster.
#[derive(Debug)]
pub struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    user: Option<(u32, u32)>,
    fsync: bool,
    /// TLS on, with `server.crt`/`server.key` in the cluster's dir.
    tls: bool,
    next_db: AtomicU32,
}

/// The certificate (chain) and key a TLS cluster serves, in PEM.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The server certificate, then any intermediates.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

/// Where the PostgreSQL server binaries are.
pub fn pg_bin() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("TESSERA_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| {
            "PostgreSQL is not installed (/usr/lib/postgresql is missing): run scripts/test.sh, \
             which installs it, or set TESSERA_PG_BIN"
                .to_string()
        })?
        .filter_map(|d| d.ok())
        .filter_map(|d| {
            let version = d.file_name().to_string_lossy().parse().ok()?;
            let bin = d.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| "no PostgreSQL server binaries under /usr/lib/postgresql".to_string())
}

/// The uid and gid the cluster runs as: the `postgres` user when we are root.
fn run_as() -> Result<Option<(u32, u32)>, String> {
    if rustix::process::geteuid().as_raw() != 0 {
        return Ok(None);
    }
    let out =
        Command::new("id").args(["-u", "postgres"]).output().map_err(|e| format!("id: {e}"))?;
    let gid =
        Command::new("id").args(["-g", "postgres"]).output().map_err(|e| format!("id: {e}"))?;
    let parse = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stdout).trim().parse::<u32>().map_err(|_| {
            "running as root and there is no `postgres` user to run PostgreSQL as".to_string()
        })
    };
    Ok(Some((parse(&out)?, parse(&gid)?)))
}

fn command(bin: &Path, name: &str, user: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(bin.join(name));
    if let Some((uid, gid)) = user {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(gid);
    }
    cmd.env_remove("PGDATA").env("LC_ALL", "C");
    cmd
}

fn run(mut cmd: Command, what: &str) -> Result<(), String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

impl PgCluster {
    /// The cluster of this test process, started on first use.
    pub fn shared() -> &'static PgCluster {
        static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
        CLUSTER.get_or_init(|| match Self::start() {
            Ok(cluster) => cluster,
            Err(e) => panic!("cannot start a PostgreSQL cluster for the tests: {e}"),
        })
    }

    /// Starts a new cluster, with fsync off (it lives as long as the tests).
    pub fn start() -> Result<Self, String> {
        Self::start_with(false)
    }

    /// Starts a new cluster; `fsync` on for measurements against a durable store.
    pub fn start_with(fsync: bool) -> Result<Self, String> {
        Self::start_inner(fsync, None)
    }

    /// Starts a new cluster that speaks TLS with `tls` and accepts TCP
    /// connections only over TLS (`hostssl`); plain ones are refused.
    pub fn start_tls(tls: &ServerTls) -> Result<Self, String> {
        Self::start_inner(false, Some(tls))
    }

    fn start_inner(fsync: bool, tls: Option<&ServerTls>) -> Result<Self, String> {
        let bin = pg_bin()?;
        let user = run_as()?;
        let dir = std::env::temp_dir().join(format!(
            "tessera-pg-{}-{}",
            std::process::id(),
            free_port()?
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if let Some((uid, gid)) = user {
            rustix::fs::chown(
                &dir,
                Some(rustix::process::Uid::from_raw(uid)),
                Some(rustix::process::Gid::from_raw(gid)),
            )
            .map_err(|e| format!("chown {}: {e}", dir.display()))?;
        }
        let data = dir.join("data");
        let mut initdb = command(&bin, "initdb", user);
        initdb.arg("-D").arg(&data).args([
            "-U",
            "tessera",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run(initdb, "initdb")?;
        if let Some(tls) = tls {
            // PostgreSQL wants its key readable by its user only.
            for (name, pem) in [("server.crt", &tls.cert_pem), ("server.key", &tls.key_pem)] {
                let path = dir.join(name);
                std::fs::write(&path, pem).map_err(|e| format!("{}: {e}", path.display()))?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                if let Some((uid, gid)) = user {
                    rustix::fs::chown(
                        &path,
                        Some(rustix::process::Uid::from_raw(uid)),
                        Some(rustix::process::Gid::from_raw(gid)),
                    )
                    .map_err(|e| format!("chown {}: {e}", path.display()))?;
                }
            }
            let hba = data.join("pg_hba.conf");
            std::fs::write(
                &hba,
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
            )
            .map_err(|e| format!("{}: {e}", hba.display()))?;
        }
        let port = free_port()?;
        let cluster = Self {
            dir: dir.clone(),
            bin: bin.clone(),
            port,
            user,
            fsync,
            tls: tls.is_some(),
            next_db: AtomicU32::new(1),
        };
        cluster.resume()?;
        // Stop the cluster and remove it once this process is gone.
        let pid_file = data.join("postmaster.pid");
        let watchdog = format!(
            "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; \
             kill -QUIT $(head -1 '{pid}') 2>/dev/null; sleep 1; rm -rf '{dir}'",
            me = std::process::id(),
            pid = pid_file.display(),
            dir = dir.display()
        );
        Command::new("sh")
            .arg("-c")
            .arg(watchdog)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("watchdog: {e}"))?;
        Ok(cluster)
    }

    /// Stops the cluster (fast shutdown: connections are cut), as when the
    /// database goes away.
    pub fn pause(&self) -> Result<(), String> {
        let mut stop = command(&self.bin, "pg_ctl", self.user);
        stop.arg("-D").arg(self.dir.join("data")).args(["-m", "fast", "-w", "stop"]);
        run(stop, "pg_ctl stop")
    }

    /// Starts the cluster (again), on the same port.
    pub fn resume(&self) -> Result<(), String> {
        let mut start = command(&self.bin, "pg_ctl", self.user);
        start
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .arg("-w")
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={} -c max_connections=300{}",
                self.port,
                self.dir.display(),
                if self.fsync { "on" } else { "off" },
                if self.tls {
                    format!(
                        " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                        self.dir.join("server.crt").display(),
                        self.dir.join("server.key").display()
                    )
                } else {
                    String::new()
                }
            ))
            .arg("start");
        run(start, "pg_ctl start")
    }

    /// The TCP port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A new, empty database; its `postgres://` URL.
    pub fn database(&self) -> String {
        let name = format!("t{}", self.next_db.fetch_add(1, Ordering::Relaxed));
        let mut createdb = Command::new(self.bin.join("createdb"));
        createdb.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "tessera", &name]);
        if let Err(e) = run(createdb, "createdb") {
            panic!("{e}");
        }
        self.url(&name)
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://tessera@127.0.0.1:{}/{name}", self.port)
    }

    /// The cluster's directory (data, log, socket).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.pause();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
