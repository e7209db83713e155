//! A throwaway PostgreSQL cluster on loopback (`initdb` and `pg_ctl` from Debian's
//! `postgresql` package, in a temporary directory), for the metadata store's tests.
//!
//! PostgreSQL refuses to run as root, so under root (CI) the cluster belongs to the
//! `postgres` system user the package creates. A missing installation is an error that
//! says how to get one, never a silent skip.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context};

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// `Some(user)` when the cluster runs as another user than this process.
    run_as: Option<String>,
}

/// The directory of `initdb` and `pg_ctl`: `$KILN_PG_BIN`, or Debian's newest.
fn postgres_bin() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KILN_PG_BIN") {
        return Ok(dir.into());
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|dir| dir.join("initdb").is_file());
    versions.sort();
    versions.pop().context(
        "no PostgreSQL server: install Debian's postgresql package (as .ci/run does) or set \
         KILN_PG_BIN to the directory holding initdb and pg_ctl",
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

impl Postgres {
    /// Makes a cluster (user `kiln`, trust authentication on loopback) and starts it.
    pub fn start() -> anyhow::Result<Postgres> {
        let bin = postgres_bin()?;
        let dir = tempfile::tempdir()?;
        let run_as = is_root().then(|| "postgres".to_string());
        if let Some(user) = &run_as {
            let status = Command::new("chown")
                .args(["-R", user])
                .arg(dir.path())
                .status()?;
            if !status.success() {
                bail!("chown {user} {}", dir.path().display());
            }
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let postgres = Postgres {
            dir,
            bin,
            port,
            run_as,
        };
        postgres.run(
            "initdb",
            &[
                "-D",
                &postgres.data().display().to_string(),
                "-U",
                "kiln",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )?;
        postgres.start_server()?;
        Ok(postgres)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs one of the server's programs as the cluster's user.
    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        let path = self.bin.join(program);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(&path);
                command
            }
            None => Command::new(&path),
        };
        let output = command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .with_context(|| format!("running {}", path.display()))?;
        if !output.status.success() {
            bail!(
                "{program} {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(output)
    }

    fn start_server(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-l",
                &self.dir.path().join("server.log").display().to_string(),
                "-o",
                &options,
                "-w",
                "start",
            ],
        )?;
        Ok(())
    }

    /// `postgres://kiln@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://kiln@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server at once (no checkpoint), as a crash would; `restart` brings it
    /// back on the same data.
    pub fn stop_immediately(&self) -> anyhow::Result<()> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                "immediate",
                "stop",
            ],
        )?;
        Ok(())
    }

    pub fn restart(&self) -> anyhow::Result<()> {
        self.start_server()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop_immediately();
    }
}
