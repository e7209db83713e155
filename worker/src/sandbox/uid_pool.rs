//! Host uids for sandboxed actions and warm sandboxes: `base..`, each held by one at a
//! time across every worker on the host.
//!
//! Within a process the indices are shared by all its workers (`kiln up` runs several).
//! Across processes (two `kiln worker`s on one host) each uid is also claimed with an
//! exclusive lock on a file of its own in [`LOCK_DIR`], held for as long as the lease.
//! Two holders of one uid would share its RLIMIT_NPROC count and could signal each
//! other's processes, and a warm sandbox's sweep, which kills every process of its uid,
//! would kill the other's action.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::sync::Mutex;

use crate::WorkerError;

/// Where uid claims are, shared by every root worker on the host (`/run` is a tmpfs: no
/// claim outlives a reboot, and a process's claims go with it, however it ends).
pub(super) const LOCK_DIR: &str = "/run/kiln/sandbox-uids";

/// The most uids one host hands out at once; past it a lease fails (every one is held by
/// a running action or a warm sandbox).
const MAX_UIDS: usize = 65_536;

/// Host uids `base..` for sandboxed actions.
#[derive(Clone, Copy)]
pub(super) struct UidPool {
    base: u32,
}

/// Which indices this process holds.
static UIDS_IN_USE: Mutex<Vec<bool>> = Mutex::new(Vec::new());

impl UidPool {
    pub(super) fn new(base: u32) -> Self {
        UidPool { base }
    }

    /// The lowest uid nothing on the host holds, claimed until the lease is dropped.
    pub(super) fn lease(&self) -> Result<UidLease, WorkerError> {
        let claim_error = |e: std::io::Error| {
            WorkerError::SandboxSetup(format!("claiming a sandbox uid in {LOCK_DIR}: {e}"))
        };
        // A list of flags holds no invariant a panicking holder could break.
        let mut in_use = UIDS_IN_USE.lock().unwrap_or_else(|e| e.into_inner());
        for index in 0..MAX_UIDS {
            if in_use.get(index).copied().unwrap_or(false) {
                continue;
            }
            let uid = self.base.saturating_add(index as u32);
            let lock = open_claim(uid).map_err(claim_error)?;
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let error = std::io::Error::last_os_error();
                if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    continue; // Another process holds it.
                }
                return Err(claim_error(error));
            }
            if in_use.len() <= index {
                in_use.resize(index + 1, false);
            }
            in_use[index] = true;
            return Ok(UidLease {
                base: self.base,
                index,
                _lock: lock,
            });
        }
        Err(WorkerError::SandboxSetup(format!(
            "all {MAX_UIDS} sandbox uids from {} are held",
            self.base
        )))
    }
}

/// The claim file of `uid`, made (with its directory, on first use) if need be.
fn open_claim(uid: u32) -> std::io::Result<File> {
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(format!("{LOCK_DIR}/{uid}"))
    };
    match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(LOCK_DIR)?;
            open()
        }
        opened => opened,
    }
}

/// One action's (or warm sandbox's) host uid, also its gid.
pub(crate) struct UidLease {
    base: u32,
    index: usize,
    /// The host-wide claim, released when closed.
    _lock: File,
}

impl UidLease {
    pub(crate) fn uid(&self) -> u32 {
        self.base.saturating_add(self.index as u32)
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        let mut in_use = UIDS_IN_USE.lock().unwrap_or_else(|e| e.into_inner());
        in_use[self.index] = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether another holder (another process, or here another open file) could claim
    /// `uid` now.
    fn claimable(uid: u32) -> bool {
        let file = File::create(format!("{LOCK_DIR}/{uid}")).unwrap();
        // SAFETY: flock on a descriptor this test owns.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    }

    #[test]
    #[ignore = "needs root (claims live in /run/kiln); `cargo test -- --ignored` runs it (.ci/run does)"]
    fn a_uid_held_elsewhere_on_the_host_is_skipped_and_a_held_one_is_not_claimable() {
        // A base of its own, so no other test's or worker's uids are involved.
        let pool = UidPool::new(1_900_000_000 + std::process::id() % 1000 * 100);
        std::fs::create_dir_all(LOCK_DIR).unwrap();
        // Another process holds the first uid.
        let first = pool.base;
        let elsewhere = File::create(format!("{LOCK_DIR}/{first}")).unwrap();
        // SAFETY: flock on a descriptor this test owns.
        assert_eq!(
            unsafe { libc::flock(elsewhere.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
            0
        );
        let lease = pool.lease().unwrap();
        assert_eq!(lease.uid(), first + 1);
        assert!(!claimable(first + 1), "a leased uid could be claimed again");
        drop(lease);
        assert!(claimable(first + 1), "a dropped lease kept its claim");
        drop(elsewhere);
        assert_eq!(pool.lease().unwrap().uid(), first);
    }
}
