//! Debian's HAProxy in front of servers on loopback, for the benchmarks that compare
//! replicas behind a balancer with one server called directly.

use std::net::SocketAddr;
use std::time::Duration;

/// HTTP/2 (gRPC) or HTTP/1.1 (the registry) through the balancer.
#[derive(Clone, Copy)]
pub enum Protocol {
    Grpc,
    Http1,
}

/// HAProxy in front of `servers`, round robin per call (gRPC) or request (HTTP/1.1);
/// ended on drop.
pub struct Balancer {
    child: std::process::Child,
    /// HAProxy's process, whose CPU the benchmarks count.
    pub pid: u32,
    /// Where clients call.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Balancer {
    pub fn start(servers: &[SocketAddr], protocol: Protocol) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let proto = match protocol {
            Protocol::Grpc => " proto h2",
            Protocol::Http1 => "",
        };
        let mut config = format!(
            "global\n    maxconn 4000\ndefaults\n    mode http\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\nfrontend farm\n    bind 127.0.0.1:{port}{proto}\n    default_backend farm\nbackend farm\n    balance roundrobin\n"
        );
        for (i, server) in servers.iter().enumerate() {
            config.push_str(&format!("    server replica{i} {server}{proto}\n"));
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let child = std::process::Command::new("haproxy")
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting haproxy (Debian's haproxy package): {e}"))?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Balancer {
            pid: child.id(),
            child,
            addr,
            _dir: dir,
        })
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
