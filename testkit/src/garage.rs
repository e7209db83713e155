//! A real Garage (an S3-compatible distributed object store) on loopback, for the object
//! store's tests: one node, or a cluster of several with one copy of every object on each.
//!
//! The binary comes from `$KILN_GARAGE`, the `PATH` or `~/.cargo/bin` (`.ci/run` installs
//! it with `cargo install garage --version 2.5.0 --locked`). A missing binary is an error
//! that says how to install it, never a silent skip.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The bucket and the key every Garage here is set up with.
pub const GARAGE_BUCKET: &str = "kiln";
const KEY_ID: &str = "GK6b696c6e2d746573742d6b65";
const SECRET: &str = "6b696c6e2074657374207365637265742c206c6f6f706261636b206f6e6c7921";
const REGION: &str = "garage";

pub struct Garage {
    dir: tempfile::TempDir,
    binary: PathBuf,
    nodes: Vec<Node>,
}

struct Node {
    config: PathBuf,
    s3: SocketAddr,
    rpc: SocketAddr,
    process: Option<Child>,
}

/// The Garage binary, or how to get one.
pub fn garage_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("KILN_GARAGE") {
        return Ok(path.into());
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("garage"));
    let in_cargo = std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo/bin/garage"));
    on_path
        .chain(in_cargo)
        .find(|candidate| candidate.is_file())
        .context(
            "no garage binary: install it with `cargo install garage --version 2.5.0 --locked` \
             (as .ci/run does) or set KILN_GARAGE",
        )
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl Garage {
    /// One node, with the bucket and key made.
    pub fn start() -> anyhow::Result<Garage> {
        Garage::start_cluster(1)
    }

    /// `nodes` nodes in one zone each, every object stored on every node
    /// (`replication_factor` = `nodes`), so any one node can die without losing data.
    ///
    /// A start that fails (a port taken between choosing and binding it, a node slow to
    /// take the layout) is tried again on new ports, up to three times in all.
    pub fn start_cluster(nodes: usize) -> anyhow::Result<Garage> {
        let mut attempt = 1;
        loop {
            match Garage::try_start_cluster(nodes) {
                Ok(garage) => return Ok(garage),
                Err(error) if attempt < 3 => {
                    eprintln!("garage did not start ({error:#}); trying again on new ports");
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn try_start_cluster(nodes: usize) -> anyhow::Result<Garage> {
        let binary = garage_binary()?;
        let dir = tempfile::tempdir()?;
        let rpc_secret: String = (0..32).map(|i| format!("{:02x}", 0x40 + i)).collect();
        let mut garage = Garage {
            dir,
            binary,
            nodes: Vec::new(),
        };
        for index in 0..nodes {
            let node_dir = garage.dir.path().join(format!("node{index}"));
            std::fs::create_dir_all(&node_dir)?;
            let (s3, rpc) = (free_port()?, free_port()?);
            let config = node_dir.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = {meta:?}\n\
                     data_dir = {data:?}\n\
                     db_engine = \"sqlite\"\n\
                     replication_factor = {nodes}\n\
                     rpc_bind_addr = \"{rpc}\"\n\
                     rpc_public_addr = \"{rpc}\"\n\
                     rpc_secret = \"{rpc_secret}\"\n\
                     [s3_api]\n\
                     s3_region = \"{REGION}\"\n\
                     api_bind_addr = \"{s3}\"\n\
                     root_domain = \".s3.garage.localhost\"\n",
                    meta = node_dir.join("meta"),
                    data = node_dir.join("data"),
                ),
            )?;
            garage.nodes.push(Node {
                config,
                s3,
                rpc,
                process: None,
            });
            garage.launch(index)?;
        }
        garage.set_up()?;
        Ok(garage)
    }

    /// The S3 endpoint of node `index` (every node serves every bucket).
    pub fn endpoint(&self, index: usize) -> String {
        format!("http://{}", self.nodes[index].s3)
    }

    pub fn region(&self) -> &'static str {
        REGION
    }

    pub fn access_key_id(&self) -> &'static str {
        KEY_ID
    }

    pub fn secret_access_key(&self) -> &'static str {
        SECRET
    }

    /// The process id of node `index` while it runs (for CPU accounting in benchmarks).
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.nodes[index].process.as_ref().map(Child::id)
    }

    /// Kills node `index` with SIGKILL, as a crash would.
    pub fn kill(&mut self, index: usize) -> anyhow::Result<()> {
        if let Some(mut process) = self.nodes[index].process.take() {
            process.kill()?;
            process.wait()?;
        }
        Ok(())
    }

    /// Starts node `index` again on its data and waits until it answers on S3.
    pub fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        self.kill(index)?;
        self.launch(index)?;
        wait_for_port(self.nodes[index].s3)
    }

    fn launch(&mut self, index: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[index];
        let log = std::fs::File::create(node.config.with_file_name("server.log"))?;
        let process = Command::new(&self.binary)
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        node.process = Some(process);
        wait_for_port(node.rpc)
    }

    /// Runs the CLI against node 0 and returns what it printed.
    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.nodes[0].config)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !output.status.success() {
            bail!(
                "garage {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Joins the nodes, gives each a role, makes the bucket and the key.
    fn set_up(&self) -> anyhow::Result<()> {
        let mut ids = Vec::new();
        for node in &self.nodes {
            let id = Command::new(&self.binary)
                .arg("-c")
                .arg(&node.config)
                .args(["node", "id", "-q"])
                .output()?;
            let id = String::from_utf8_lossy(&id.stdout).trim().to_string();
            let short = id.split('@').next().unwrap_or_default().to_string();
            if short.is_empty() {
                bail!("garage node id printed nothing");
            }
            ids.push((id, short));
        }
        for (full, _) in ids.iter().skip(1) {
            self.cli(&["node", "connect", full])?;
        }
        for (zone, (_, short)) in ids.iter().enumerate() {
            self.cli(&[
                "layout",
                "assign",
                "-z",
                &format!("z{zone}"),
                "-c",
                "1G",
                short,
            ])?;
        }
        self.retry(|| self.cli(&["layout", "apply", "--version", "1"]))?;
        self.cli(&["key", "import", "--yes", "-n", "kiln", KEY_ID, SECRET])?;
        self.retry(|| self.cli(&["bucket", "create", GARAGE_BUCKET]))?;
        self.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            GARAGE_BUCKET,
            "--key",
            "kiln",
        ])?;
        for node in &self.nodes {
            wait_for_port(node.s3)?;
        }
        Ok(())
    }

    /// A cluster that has just formed may refuse a command until every node sees the
    /// layout; try for a bounded while.
    fn retry(&self, mut command: impl FnMut() -> anyhow::Result<String>) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match command() {
                Ok(_) => return Ok(()),
                Err(error) if Instant::now() > deadline => return Err(error),
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// Where the nodes keep their logs, for a failing test to point at.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn wait_for_port(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!("garage did not listen on {addr} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

impl Drop for Garage {
    fn drop(&mut self) {
        for index in 0..self.nodes.len() {
            let _ = self.kill(index);
        }
    }
}
