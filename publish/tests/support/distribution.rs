//! CNCF distribution (Debian's `docker-registry`) as a peer registry for tests: started
//! on a free loopback port with a private config and storage, killed by PID on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Distribution {
    pub address: String,
    child: Child,
    _storage: tempfile::TempDir,
}

const BINARY: &str = "docker-registry";

impl Distribution {
    /// Starts the registry. Fails loudly when the binary is missing: install it with
    /// `apt-get install -y --no-install-recommends docker-registry`.
    pub async fn start() -> Distribution {
        let binary = find_binary().unwrap_or_else(|| {
            panic!(
                "`{BINARY}` is not installed; these tests need it: \
                 apt-get install -y --no-install-recommends docker-registry"
            )
        });
        let storage = tempfile::tempdir().unwrap();
        // Port 0: distribution binds a free port itself and logs which, so no port is
        // released by one process and reused by another.
        let config = storage.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:0\n",
                storage.path().join("data").display()
            ),
        )
        .unwrap();
        let mut child = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker-registry starts");
        let address = listening_address(&mut child);
        let registry = Distribution {
            address,
            child,
            _storage: storage,
        };
        registry.wait_until_ready().await;
        registry
    }

    async fn wait_until_ready(&self) {
        let url = format!("http://{}/v2/", self.address);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(response) = reqwest::get(&url).await {
                if response.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not come up at {url}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address distribution logs once it listens (`msg="listening on 127.0.0.1:PORT"`).
/// A thread keeps draining its log afterwards so that it never blocks on a full pipe.
fn listening_address(child: &mut Child) -> String {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr is piped");
    let (found, address) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut found = Some(found);
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let Some(rest) = line.split("listening on ").nth(1) else {
                continue;
            };
            if let Some(found) = found.take() {
                let address: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                    .collect();
                let _ = found.send(address);
            }
        }
    });
    address
        .recv_timeout(Duration::from_secs(15))
        .expect("docker-registry logs the address it listens on within 15 s")
}

fn find_binary() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| PathBuf::from(dir).join(BINARY))
        .find(|path| path.is_file())
}
