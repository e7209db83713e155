//! The sandbox of an action that runs in a container image: the image's root filesystem,
//! read-only, takes the place of the host's system directories, and the action's
//! directory appears at [`EXEC_ROOT`], since the host's path to it may cross directories
//! the image has (`/var`, `/home`) and REAPI paths are relative to it anyway.
//!
//! A root worker drops to the action's uid with the host's `setpriv`, which links
//! against the host's libc, not the image's (a busybox image has none): it runs under the
//! host's dynamic loader with the host's libraries, bound read-only at [`HOST_TOOLS`];
//! the command it then starts is the image's own.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where the action's directory is inside an image's sandbox.
pub(crate) const EXEC_ROOT: &str = "/kiln/exec";
/// Where the host's setpriv and its libraries are, inside an image's sandbox.
const HOST_TOOLS: &str = "/kiln/host";

/// The host's dynamic loader; its directory holds libc and setpriv's other libraries.
#[cfg(target_arch = "x86_64")]
const HOST_LOADER: &str = "/lib64/ld-linux-x86-64.so.2";
#[cfg(target_arch = "aarch64")]
const HOST_LOADER: &str = "/lib/ld-linux-aarch64.so.1";

/// Entries of the image's root the sandbox provides itself (or, for `kiln`, uses).
const PROVIDED: &[&str] = &["dev", "proc", "tmp", "kiln"];

/// bwrap arguments showing each top-level entry of `root` read-only at `/`: directories
/// and files bound, links recreated as links.
pub(crate) fn root_args(root: &Path) -> std::io::Result<Vec<OsString>> {
    let mut entries: Vec<_> = std::fs::read_dir(root)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|entry| entry.file_name());
    let mut args = Vec::new();
    for entry in entries {
        let name = entry.file_name();
        if PROVIDED.iter().any(|provided| name == *provided) {
            continue;
        }
        let inside = Path::new("/").join(&name);
        if entry.file_type()?.is_symlink() {
            let target = std::fs::read_link(entry.path())?;
            args.extend([
                "--symlink".into(),
                target.into_os_string(),
                inside.into_os_string(),
            ]);
        } else {
            args.extend([
                "--ro-bind".into(),
                entry.path().into_os_string(),
                inside.into_os_string(),
            ]);
        }
    }
    Ok(args)
}

/// The host's setpriv, made runnable inside an image: the binds it needs, and the argv
/// prefix that starts it under the host's loader.
#[derive(Clone, Debug)]
pub(crate) struct HostSetpriv {
    binds: Vec<OsString>,
    prefix: Vec<OsString>,
}

impl HostSetpriv {
    pub(crate) fn new(setpriv: &Path) -> std::io::Result<Self> {
        let loader = std::fs::canonicalize(HOST_LOADER)?;
        let (Some(libraries), Some(loader_name)) = (loader.parent(), loader.file_name()) else {
            return Err(std::io::Error::other("the host's loader has no directory"));
        };
        let lib = PathBuf::from(HOST_TOOLS).join("lib");
        let tool = PathBuf::from(HOST_TOOLS).join("setpriv");
        Ok(HostSetpriv {
            binds: vec![
                "--ro-bind".into(),
                libraries.into(),
                lib.clone().into(),
                "--ro-bind".into(),
                setpriv.into(),
                tool.clone().into(),
            ],
            prefix: vec![
                lib.join(loader_name).into(),
                "--library-path".into(),
                lib.into(),
                tool.into(),
            ],
        })
    }

    pub(crate) fn binds(&self) -> &[OsString] {
        &self.binds
    }

    /// What starts setpriv, in place of its path.
    pub(crate) fn prefix(&self) -> &[OsString] {
        &self.prefix
    }
}
