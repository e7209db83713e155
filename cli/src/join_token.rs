//! `kiln up`'s join token: generated on first start and kept in the data directory, so
//! that `kiln drain` (and an operator starting `kiln worker --join-token "$(cat …)"`) can
//! find it, and a restarted farm keeps accepting the workers it had.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("join-token")
}

/// The token kept in `data_dir`, if there is one.
pub fn read(data_dir: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path(data_dir)) {
        Ok(token) => Ok(Some(token.trim().to_string()).filter(|t| !t.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path(data_dir).display())),
    }
}

/// The kept token, or a fresh one written (owner-only, durably) for next time.
pub fn read_or_create(data_dir: &Path) -> anyhow::Result<String> {
    if let Some(token) = read(data_dir)? {
        return Ok(token);
    }
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    let token = hex::encode(bytes);
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let mut file = tempfile::NamedTempFile::new_in(data_dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    writeln!(file, "{token}")?;
    file.as_file().sync_all()?;
    file.persist(path(data_dir))
        .with_context(|| format!("writing {}", path(data_dir).display()))?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_created_once_private_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let first = read_or_create(dir.path()).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(read_or_create(dir.path()).unwrap(), first);
        assert_eq!(read(dir.path()).unwrap(), Some(first));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
