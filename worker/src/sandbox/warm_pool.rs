//! Warm sandboxes: namespaces built once and entered by one action after another.
//!
//! Building a sandbox costs bubblewrap several milliseconds of kernel work per action
//! (new mount, PID, IPC, UTS and network namespaces, a dozen mounts, then their
//! teardown), on 2 cores more than kiln's whole handling of a short action. A root worker
//! on a host therefore keeps sandboxes warm: each is a bubblewrap sandbox whose only
//! process is a holder, with a directory of its own (its *slot*) bound at the same path
//! inside, and a host uid of its own for as long as it lives. An action runs in one by
//! entering its namespaces (`SpawnRequest::enter`), with its directory renamed into the
//! slot for the run and back afterwards.
//!
//! What one action leaves, the next in the same sandbox must not see. Between actions:
//! - every process of the sandbox's uid is killed, from a process of that uid, until none
//!   is left: `setsid`, double forks and daemons included;
//! - the sandbox's `/tmp` (a host directory bound there) is emptied;
//! - a sandbox in whose IPC namespace a System V object was left is thrown away, and POSIX
//!   message queues are off in it (`fs.mqueue.queues_max` = 0);
//! - everything else an action could change is read-only to it or dies with its processes
//!   (sockets, abstract Unix sockets, ptys).

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;

use super::{bubblewrap_args, BwrapUse, UidLease, UidPool};
use crate::process_spawn::clone_suspended;
use crate::WorkerError;

/// The holder: turns POSIX message queues off in the sandbox's IPC namespace (root there
/// may), then waits on its stdin, a pipe whose other end the worker holds, so the sandbox
/// goes when the worker does, however it ends.
const HOLDER: &str = "echo 0 > /proc/sys/fs/mqueue/queues_max && exec cat";

/// How long the killed processes of an action may take to be gone (a process in an
/// uninterruptible wait finishes it first) before the sandbox is given up.
const SWEEP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Sandboxes ready for an action, for every worker of the process alike.
pub(crate) struct WarmPool {
    bwrap: PathBuf,
    system_dirs: Vec<OsString>,
    uids: UidPool,
    idle: Mutex<Vec<WarmSandbox>>,
}

/// One warm sandbox; dropping it ends the holder, and with it the sandbox.
pub(crate) struct WarmSandbox {
    /// The directory bound at the same path inside; an action's directory is renamed to
    /// `slot/exec` for its run.
    slot: PathBuf,
    /// The host directory bound at `/tmp` inside.
    tmp: PathBuf,
    /// The entry of `/tmp` that leads to the slot, when the slot lies under `/tmp`
    /// (bubblewrap made the way there, root's, 0755, in the bound directory): kept.
    way_to_slot: Option<OsString>,
    uid: UidLease,
    /// The sandbox's PID 1 (bubblewrap's init), whose namespaces actions enter.
    init: OwnedFd,
    /// `/proc/<init>/task/<init>/children`, and what it holds with no action running.
    children_file: PathBuf,
    idle_children: String,
    /// bwrap, outside the sandbox.
    holder: Child,
    /// The holder's stdin: closing it ends the holder, whose exit ends the sandbox's
    /// init and with it every process inside.
    holder_stdin: Option<ChildStdin>,
}

impl WarmPool {
    pub(super) fn new(bwrap: PathBuf, system_dirs: Vec<OsString>, uids: UidPool) -> Self {
        WarmPool {
            bwrap,
            system_dirs,
            uids,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// An idle sandbox whose slot lies in `dir`, if there is one.
    pub(crate) fn take_idle(&self, dir: &Path) -> Option<WarmSandbox> {
        // A list of sandboxes holds no invariant a panicking holder could break.
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let at = idle.iter().position(|s| s.slot.parent() == Some(dir))?;
        Some(idle.swap_remove(at))
    }

    /// Takes a sandbox back after its action, swept (`WarmSandbox::sweep`) and with the
    /// action's directory moved back out: it is kept for the next, with `/tmp` emptied,
    /// or dropped when `reusable` is false or that fails.
    pub(crate) fn give_back(&self, sandbox: WarmSandbox, reusable: bool) {
        if !reusable {
            tracing::debug!("a warm sandbox held IPC objects after its action; dropped");
            return;
        }
        match sandbox.empty_tmp() {
            Ok(()) => {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                idle.push(sandbox);
            }
            Err(error) => tracing::warn!(%error, "emptying a warm sandbox's /tmp; dropped"),
        }
    }

    /// Builds one sandbox in a temporary directory and ends it: the worker's start-up
    /// check that warm sandboxes can be made here at all.
    pub(super) fn trial(&self) -> Result<(), WorkerError> {
        let dir = tempfile::tempdir().map_err(WorkerError::io("making the trial's directory"))?;
        drop(self.build(dir.path())?);
        Ok(())
    }

    /// A new sandbox whose slot lies in `dir`. It starts bwrap and waits for it (up to
    /// about 1 s): call it off the async runtime's threads.
    pub(crate) fn build(&self, dir: &Path) -> Result<WarmSandbox, WorkerError> {
        let uid = self.uids.lease()?;
        let slot = dir.join(format!(".sandbox-{}", uid.uid()));
        let tmp = dir.join(format!(".sandbox-{}.tmp", uid.uid()));
        for path in [&slot, &tmp] {
            let _ = std::fs::remove_dir_all(path);
            std::fs::create_dir(path).map_err(WorkerError::io(format!(
                "creating the sandbox directory {}",
                path.display()
            )))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))
            .map_err(WorkerError::io("opening the sandbox's /tmp to its uid"))?;

        let (info_read, info_write) = pipe()?;
        let mut command = Command::new(&self.bwrap);
        command
            .args(&self.system_dirs)
            .args(bubblewrap_args(&slot, &slot, &slot, BwrapUse::Warm(&tmp)))
            .args(["--info-fd", "3", "--", "/bin/sh", "-c", HOLDER])
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let info_fd = info_write.as_raw_fd();
        // SAFETY: dup2 is async-signal-safe; it gives bwrap the pipe as fd 3, without
        // close-on-exec.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(info_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut holder = command
            .spawn()
            .map_err(WorkerError::io("starting a warm sandbox"))?;
        drop(info_write);
        let mut info = String::new();
        let read = std::fs::File::from(info_read).read_to_string(&mut info);
        let init_pid = read.ok().and_then(|_| child_pid(&info));
        let Some(init_pid) = init_pid else {
            let _ = holder.kill();
            let output = holder.wait_with_output();
            let stderr = output.map(|o| o.stderr).unwrap_or_default();
            return Err(WorkerError::SandboxSetup(format!(
                "a warm sandbox did not start: {}",
                String::from_utf8_lossy(&stderr).trim()
            )));
        };
        // SAFETY: pidfd_open on a pid bubblewrap just reported for a process it still
        // waits for (the holder blocks on our pipe), so the pid names that process.
        let init = unsafe { libc::syscall(libc::SYS_pidfd_open, init_pid, 0) };
        if init < 0 {
            let _ = holder.kill();
            let _ = holder.wait();
            return Err(WorkerError::io("opening the warm sandbox's init")(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
        let init = unsafe { OwnedFd::from_raw_fd(init as libc::c_int) };
        let holder_stdin = holder.stdin.take().expect("stdin was piped");
        let children_file = PathBuf::from(format!("/proc/{init_pid}/task/{init_pid}/children"));
        // The holder is the init's only child; it starts at once, but wait for it. A
        // sandbox without it would have an empty idle listing, and every sweep after an
        // action would then wait out its deadline: refuse it instead.
        let mut idle_children = String::new();
        for _ in 0..1000 {
            idle_children = std::fs::read_to_string(&children_file)
                .map_err(WorkerError::io("listing the warm sandbox's processes"))?;
            if !idle_children.trim().is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if idle_children.trim().is_empty() {
            drop(holder_stdin);
            let _ = holder.kill();
            let _ = holder.wait();
            return Err(WorkerError::SandboxSetup(
                "a warm sandbox's holder process did not start within 1 s".into(),
            ));
        }
        let way_to_slot = slot
            .strip_prefix("/tmp")
            .ok()
            .and_then(|inside| inside.iter().next())
            .map(OsString::from);
        Ok(WarmSandbox {
            slot,
            tmp,
            way_to_slot,
            uid,
            init,
            children_file,
            idle_children,
            holder,
            holder_stdin: Some(holder_stdin),
        })
    }
}

impl WarmSandbox {
    pub(crate) fn uid(&self) -> u32 {
        self.uid.uid()
    }

    /// A pidfd whose namespaces an action enters.
    pub(crate) fn namespaces(&self) -> libc::c_int {
        self.init.as_raw_fd()
    }

    /// Where an action's directory goes for its run (host path = path inside).
    pub(crate) fn exec_root(&self) -> PathBuf {
        self.slot.join("exec")
    }

    /// After an action: kills every process left of it and waits until they are gone,
    /// and says whether the sandbox can take another action (no IPC object left in it).
    pub(crate) async fn sweep(&self) -> std::io::Result<bool> {
        let ipc_clean = kill_all_of(self.uid(), self.namespaces())?;
        // The killed are gone once the sandbox's init has reaped them (each orphan becomes
        // its child): its children are then the holder alone, as at the start.
        let deadline = tokio::time::Instant::now() + SWEEP_DEADLINE;
        while self.init_children()? != self.idle_children {
            if tokio::time::Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "processes of the action outlived SIGKILL for {SWEEP_DEADLINE:?}"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        Ok(ipc_clean)
    }

    /// The sandbox init's children, as the kernel lists them.
    fn init_children(&self) -> std::io::Result<String> {
        std::fs::read_to_string(&self.children_file)
    }

    fn empty_tmp(&self) -> std::io::Result<()> {
        for entry in std::fs::read_dir(&self.tmp)? {
            let entry = entry?;
            if Some(entry.file_name()) == self.way_to_slot {
                continue;
            }
            let path = entry.path();
            let removed = match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
            removed?;
        }
        Ok(())
    }
}

impl Drop for WarmSandbox {
    fn drop(&mut self) {
        // What ends the sandbox; bwrap outside it is then only reaped.
        drop(self.holder_stdin.take());
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = std::fs::remove_dir_all(&self.slot);
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), WorkerError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors, which nothing else owns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(WorkerError::io("making a pipe")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: as above.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The `child-pid` of bubblewrap's `--info-fd` JSON.
fn child_pid(info: &str) -> Option<libc::pid_t> {
    let value: serde_json::Value = serde_json::from_str(info).ok()?;
    value.get("child-pid")?.as_i64()?.try_into().ok()
}

/// What the sweep child reads and reports.
struct SweepPlan {
    uid: libc::c_long,
    namespaces: libc::c_int,
    /// Set by the child: 0, or the errno of what failed.
    errno: libc::c_int,
    /// Set by the child: bytes of /proc/sysvipc listings past their header lines.
    ipc_bytes: usize,
}

/// The System V IPC listings of the caller's IPC namespace.
const SYSVIPC: [&[u8]; 3] = [
    b"/proc/sysvipc/shm\0",
    b"/proc/sysvipc/sem\0",
    b"/proc/sysvipc/msg\0",
];

/// Kills every process of `uid`, in a child that takes that uid (so `kill(-1)` reaches
/// exactly those), then reads whether the sandbox's IPC namespace holds objects. Returns
/// whether it is clean.
fn kill_all_of(uid: u32, namespaces: libc::c_int) -> std::io::Result<bool> {
    let mut plan = SweepPlan {
        uid: libc::c_long::from(uid),
        namespaces,
        errno: 0,
        ipc_bytes: 0,
    };
    let mut no_pidfd = -1;
    // SAFETY: `sweep_main` only makes system calls on the plan, which outlives it (vfork).
    let pid = unsafe {
        clone_suspended(
            sweep_main,
            (&mut plan as *mut SweepPlan).cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &mut no_pidfd,
        )?
    };
    // SAFETY: waitpid on our own child with a valid status pointer.
    unsafe {
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
    if plan.errno != 0 {
        return Err(std::io::Error::from_raw_os_error(plan.errno));
    }
    Ok(plan.ipc_bytes == 0)
}

extern "C" fn sweep_main(plan: *mut libc::c_void) -> libc::c_int {
    // SAFETY: the parent's SweepPlan, alive while it waits (vfork).
    let plan = unsafe { &mut *(plan as *mut SweepPlan) };
    // SAFETY: system calls on the plan's values and this stack's buffers.
    unsafe {
        let fail = |plan: &mut SweepPlan| -> libc::c_int {
            plan.errno = *libc::__errno_location();
            libc::_exit(1)
        };
        // Into the sandbox's IPC namespace first, while still root.
        if libc::setns(plan.namespaces, libc::CLONE_NEWIPC) != 0 {
            return fail(plan);
        }
        let no_groups = std::ptr::null::<libc::gid_t>();
        if libc::syscall(libc::SYS_setgroups, 0 as libc::c_long, no_groups) != 0
            || libc::syscall(libc::SYS_setresgid, plan.uid, plan.uid, plan.uid) != 0
            || libc::syscall(libc::SYS_setresuid, plan.uid, plan.uid, plan.uid) != 0
        {
            return fail(plan);
        }
        // kill(-1) signals every process this uid may signal, but the caller, in one
        // pass under the kernel's task-list lock, so no fork slips past it; and a process
        // with SIGKILL pending can neither fork nor return to user space. (Its return
        // value says nothing: success whenever any process exists at all.)
        libc::kill(-1, libc::SIGKILL);
        let mut buffer = [0u8; 512];
        for path in SYSVIPC {
            let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                continue;
            }
            let (mut total, mut header) = (0usize, None);
            loop {
                let read = libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len());
                if read <= 0 {
                    break;
                }
                // One header line, under 512 bytes; anything past it is an object.
                header = header.or(buffer.iter().position(|&b| b == b'\n').map(|at| at + 1));
                total += read as usize;
            }
            libc::close(fd);
            plan.ipc_bytes += total.saturating_sub(header.unwrap_or(0));
        }
        libc::_exit(0)
    }
}
