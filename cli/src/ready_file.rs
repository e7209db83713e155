//! `--ready-file PATH`: once every listener of the process is bound and serving, the
//! addresses are written there as JSON, e.g.
//! `{"grpc":"127.0.0.1:41234","metrics":"127.0.0.1:40001","registry":"127.0.0.1:5000"}`.
//! Whoever starts kiln on port 0 (tests, scripts, supervisors) reads the ports from it
//! instead of from log wording. The file appears whole or not at all (temp file, fsync,
//! rename), so a reader that sees it can parse it.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;

/// Writes `addresses` (listener name → bound address) to `path` atomically.
pub fn write(path: &Path, addresses: &BTreeMap<&'static str, SocketAddr>) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let json: BTreeMap<&str, String> = addresses
        .iter()
        .map(|(name, addr)| (*name, addr.to_string()))
        .collect();
    let mut file = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating the ready file next to {}", path.display()))?;
    serde_json::to_writer(&mut file, &json)?;
    file.write_all(b"\n")?;
    file.as_file().sync_all()?;
    file.persist(path)
        .with_context(|| format!("writing the ready file {}", path.display()))?;
    Ok(())
}
