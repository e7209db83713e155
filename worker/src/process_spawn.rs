//! Starting an action's process without copying the worker's address space.
//!
//! `fork` copies the parent's page tables, and every page either side then touches is
//! copied again: in a worker that shares its process with the coordinator (`kiln up`) that
//! was most of the CPU a short action cost. Rust's `Command` avoids it with `posix_spawn`,
//! but only when no `pre_exec` hook is set, and actions need one for their rlimits. So
//! this does what `posix_spawn` does inside glibc: `clone(CLONE_VM | CLONE_VFORK)` on a
//! stack of its own, with a child that only makes async-signal-safe system calls
//! (process group, rlimits, working directory, stdio, uid, signal dispositions) before
//! `execve`. The parent thread sleeps until the child has exec'd or failed. The child is
//! waited for through a pidfd, so nothing else in the process can reap it by mistake.
//!
//! A child may also start inside a warm sandbox (`SpawnRequest::enter`): a first clone
//! joins the sandbox's namespaces with `setns`, then clones the child proper with
//! `CLONE_PARENT`, so that it is born in the sandbox's PID namespace yet is this
//! process's child, and exits.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;

/// The child runs on this much stack until it execs: a handful of system calls.
const CHILD_STACK_BYTES: usize = 64 << 10;

/// What to start.
pub(crate) struct SpawnRequest<'a> {
    /// argv; the first element is the program, looked up on the `PATH` of `environment`
    /// (or `/bin:/usr/bin`) unless it contains a `/`.
    pub arguments: &'a [&'a OsStr],
    /// The complete environment.
    pub environment: &'a [(String, String)],
    pub working_dir: &'a Path,
    pub stdin: &'a File,
    pub stdout: &'a File,
    pub stderr: &'a File,
    /// (resource, soft and hard limits) applied with setrlimit.
    pub rlimits: &'a [(libc::__rlimit_resource_t, libc::rlimit)],
    /// The uid and gid (one number, no supplementary groups) the child takes just before
    /// execve, when it is not to keep this process's.
    pub identity: Option<u32>,
    /// A pidfd of a process whose mount, UTS, IPC, network, PID and cgroup namespaces the
    /// child joins; it then also cannot gain privileges by exec (no_new_privs).
    pub enter: Option<libc::c_int>,
}

/// The namespaces a child joins with `SpawnRequest::enter`.
const ENTERED_NAMESPACES: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWCGROUP;

/// A started child in its own process group (its pid is the group id).
pub(crate) struct SpawnedChild {
    pid: libc::pid_t,
    pidfd: AsyncFd<OwnedFd>,
    reaped: bool,
}

/// Everything the child reads, prepared by the parent (the child must not allocate).
struct ChildPlan {
    candidates: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    working_dir: CString,
    stdio: [libc::c_int; 3],
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    identity: Option<u32>,
    /// The pidfd whose namespaces to join, and the stack the child proper runs on then.
    enter: Option<(libc::c_int, usize)>,
    /// The child proper, when an intermediate started it: its pid and pidfd.
    entered_child: (libc::pid_t, libc::c_int),
    /// Set by the child when it fails before execve, with the step that failed.
    errno: libc::c_int,
    failed_step: &'static str,
}

/// Why a child did not start: the step that failed (`execve` when the program could not
/// be run, a set-up step such as `setns` or `chdir` otherwise) and its error.
#[derive(Debug)]
pub(crate) struct SpawnError {
    pub step: &'static str,
    pub source: io::Error,
}

/// The parent's own failures, before the child exists.
impl From<io::Error> for SpawnError {
    fn from(source: io::Error) -> Self {
        SpawnError {
            step: "preparing",
            source,
        }
    }
}

impl SpawnError {
    /// Whether the program itself could not be run (missing, not executable).
    pub(crate) fn is_exec(&self) -> bool {
        self.step == "execve"
    }
}

fn c_string(bytes: &[u8], what: &str) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// Where execvp would look for `program`, in order.
fn program_candidates(
    program: &OsStr,
    environment: &[(String, String)],
) -> io::Result<Vec<CString>> {
    if program.as_bytes().contains(&b'/') {
        return Ok(vec![c_string(program.as_bytes(), "the program")?]);
    }
    let path = environment
        .iter()
        .rev()
        .find(|(name, _)| name == "PATH")
        .map_or("/bin:/usr/bin", |(_, value)| value.as_str());
    path.split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            let mut candidate = dir.as_bytes().to_vec();
            candidate.push(b'/');
            candidate.extend_from_slice(program.as_bytes());
            c_string(&candidate, "a PATH entry")
        })
        .collect()
}

/// Starts the child. Errors before `execve` (no such program, a failed chdir) come back
/// as the child's errno, like `Command::spawn`'s, with the step that failed.
pub(crate) fn spawn(request: &SpawnRequest<'_>) -> Result<SpawnedChild, SpawnError> {
    let (program, _) = request
        .arguments
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no program to run"))?;
    let candidates = program_candidates(program, request.environment)?;
    let arguments: Vec<CString> = request
        .arguments
        .iter()
        .map(|a| c_string(a.as_bytes(), "an argument"))
        .collect::<io::Result<_>>()?;
    let environment: Vec<CString> = request
        .environment
        .iter()
        .map(|(k, v)| c_string(format!("{k}={v}").as_bytes(), "an environment variable"))
        .collect::<io::Result<_>>()?;
    // Duplicates are numbered 3 or above, so dup2 onto 0..2 cannot clobber a source.
    let stdio = [
        request.stdin.try_clone()?,
        request.stdout.try_clone()?,
        request.stderr.try_clone()?,
    ];
    let mut plan = ChildPlan {
        candidates,
        argv: arguments
            .iter()
            .map(|a| a.as_ptr())
            .chain([std::ptr::null()])
            .collect(),
        envp: environment
            .iter()
            .map(|e| e.as_ptr())
            .chain([std::ptr::null()])
            .collect(),
        working_dir: c_string(
            request.working_dir.as_os_str().as_bytes(),
            "the working directory",
        )?,
        stdio: [
            stdio[0].as_raw_fd(),
            stdio[1].as_raw_fd(),
            stdio[2].as_raw_fd(),
        ],
        rlimits: request.rlimits.to_vec(),
        identity: request.identity,
        enter: None,
        entered_child: (-1, -1),
        errno: 0,
        failed_step: "",
    };
    let mut entered_stack = Vec::new();
    let (entry, flags) = match request.enter {
        None => (
            child_main as ChildEntry,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
        ),
        Some(pidfd) => {
            entered_stack = vec![0u8; CHILD_STACK_BYTES];
            let entered_top = stack_top(&mut entered_stack);
            plan.enter = Some((pidfd, entered_top));
            // CLONE_FILES: the child proper's pidfd lands in this process's table.
            (
                intermediate_main as ChildEntry,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_FILES | libc::SIGCHLD,
            )
        }
    };
    let mut pidfd: libc::c_int = -1;
    // SAFETY: `plan` and the CStrings it points into outlive the child's use of them
    // (vfork). The child runs only `child_main` (or `intermediate_main`, which suspends
    // in turn until the child proper has exec'd or exited), and so only system calls.
    let cloned = unsafe {
        clone_suspended(
            entry,
            (&mut plan as *mut ChildPlan).cast(),
            flags,
            &mut pidfd,
        )
    };
    drop((entered_stack, stdio));
    let pid = match cloned {
        Ok(pid) => pid,
        Err(clone_error) if clone_error.raw_os_error() == Some(libc::EINVAL) => {
            return Err(SpawnError::from(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("starting actions needs Linux 5.2 or later (clone with CLONE_PIDFD): {clone_error}"),
            )));
        }
        Err(clone_error) => return Err(clone_error.into()),
    };
    let (pid, pidfd) = if plan.enter.is_some() {
        // The intermediate has exited (vfork); collect it. The child proper, if it was
        // started, is ours through CLONE_PARENT.
        // SAFETY: waitpid on our own child with a valid status pointer; the intermediate
        // wrote `entered_child` before it exited.
        unsafe {
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            std::ptr::read_volatile(&plan.entered_child)
        }
    } else {
        (pid, pidfd)
    };
    // SAFETY: the child is gone or exec'd; it wrote `errno` (if at all) before that.
    let child_errno = unsafe { std::ptr::read_volatile(&plan.errno) };
    if child_errno != 0 || pid < 0 {
        if pid > 0 {
            // It has exited already; collect it so no zombie is left.
            // SAFETY: waitpid on our own child with a valid status pointer; the pidfd,
            // if any, is ours to close.
            unsafe {
                let mut status = 0;
                libc::waitpid(pid, &mut status, 0);
                libc::close(pidfd);
            }
        }
        return Err(SpawnError {
            step: plan.failed_step,
            source: io::Error::from_raw_os_error(child_errno),
        });
    }
    // SAFETY: clone stored a new pidfd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: the OwnedFd is open and stays the same descriptor for as long as the
    // AsyncFd owns it.
    let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(|e| SpawnError::from(e.into_parts().1))?;
    Ok(SpawnedChild {
        pid,
        pidfd,
        reaped: false,
    })
}

/// The entry point of a child made by `clone_suspended`.
pub(crate) type ChildEntry = extern "C" fn(*mut libc::c_void) -> libc::c_int;

/// The 16-byte aligned top of `stack` (stacks grow down).
fn stack_top(stack: &mut [u8]) -> usize {
    (stack.as_mut_ptr() as usize + stack.len()) & !15
}

/// Runs `entry(arg)` in a child that shares this process's memory (`CLONE_VM |
/// CLONE_VFORK` among `flags`), on a stack of its own, and returns its pid once it has
/// exec'd or exited. Every signal is blocked around the clone, so no handler of this
/// process runs on the child's borrowed memory before the child has reset them; the
/// thread's mask is restored right after. `pidfd` receives a pidfd with `CLONE_PIDFD`.
///
/// # Safety
/// `entry` must only make system calls (no allocation, no locks: it shares the parent's
/// heap and threads' locks), and `arg` must point to what `entry` expects.
pub(crate) unsafe fn clone_suspended(
    entry: ChildEntry,
    arg: *mut libc::c_void,
    flags: libc::c_int,
    pidfd: &mut libc::c_int,
) -> io::Result<libc::pid_t> {
    let mut stack = vec![0u8; CHILD_STACK_BYTES];
    let top = stack_top(&mut stack);
    // SAFETY: the caller vouches for `entry` and `arg`; the stack and `pidfd` outlive the
    // child's use of them, since CLONE_VFORK suspends this thread until it is done.
    let (pid, clone_error) = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
        let pid = libc::clone(
            entry,
            top as *mut libc::c_void,
            flags,
            arg,
            pidfd as *mut libc::c_int,
        );
        let clone_error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        (pid, clone_error)
    };
    drop(stack);
    if pid < 0 {
        return Err(clone_error);
    }
    Ok(pid)
}

/// With `SpawnRequest::enter`: joins the sandbox's namespaces, starts the child proper (in
/// its PID namespace, as a child of the spawning process), and exits once that has
/// exec'd or failed. Like `child_main`, it only makes system calls.
extern "C" fn intermediate_main(plan: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `plan` is the parent's ChildPlan, alive while the parent waits (vfork).
    let plan = unsafe { &mut *(plan as *mut ChildPlan) };
    let Some((pidfd, stack_top)) = plan.enter else {
        return 127;
    };
    // SAFETY: system calls on a pidfd the parent holds open and a stack it owns for as
    // long as this vfork chain runs; CLONE_PIDFD writes the new descriptor into the plan.
    unsafe {
        if libc::setns(pidfd, ENTERED_NAMESPACES) != 0 {
            plan.errno = *libc::__errno_location();
            plan.failed_step = "setns";
            libc::_exit(127);
        }
        let mut child_pidfd: libc::c_int = -1;
        let pid = libc::clone(
            child_main,
            stack_top as *mut libc::c_void,
            libc::CLONE_VM
                | libc::CLONE_VFORK
                | libc::CLONE_PARENT
                | libc::CLONE_PIDFD
                | libc::SIGCHLD,
            (plan as *mut ChildPlan).cast(),
            &mut child_pidfd as *mut libc::c_int,
        );
        if pid < 0 {
            plan.errno = *libc::__errno_location();
            plan.failed_step = "clone";
            libc::_exit(127);
        }
        plan.entered_child = (pid, child_pidfd);
        libc::_exit(0)
    }
}

/// The child between clone and execve. It shares the parent's memory, so it only reads
/// the plan and makes system calls; it never allocates or takes a lock.
extern "C" fn child_main(plan: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `plan` is the parent's ChildPlan, alive while the parent waits (vfork).
    let plan = unsafe { &mut *(plan as *mut ChildPlan) };
    // SAFETY: async-signal-safe system calls on valid, NUL-terminated data from the plan.
    unsafe {
        // Handlers are the parent's code and must not run here; SIGPIPE goes back to its
        // default, which Rust programs ignore (std's spawn does the same).
        for signal in 1..=libc::SIGRTMAX() {
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut current) != 0 {
                continue;
            }
            let handled =
                current.sa_sigaction != libc::SIG_DFL && current.sa_sigaction != libc::SIG_IGN;
            if handled || signal == libc::SIGPIPE {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        let fail = |plan: &mut ChildPlan, step: &'static str| -> libc::c_int {
            plan.errno = *libc::__errno_location();
            plan.failed_step = step;
            libc::_exit(127)
        };
        if libc::setpgid(0, 0) != 0 {
            return fail(plan, "setpgid");
        }
        // No terminal of the worker's within reach (`kiln up` in a shell has one): give up
        // the controlling terminal, which a process that leads no session does alone. Not
        // a session of its own: with the scheduler's autogroups on, each session is a
        // scheduling group, whose making and unmaking cut sandboxed throughput to a
        // fifth beside any background load.
        let tty = libc::open(
            c"/dev/tty".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if tty >= 0 {
            let detached = libc::ioctl(tty, libc::TIOCNOTTY) == 0;
            libc::close(tty);
            if !detached {
                return fail(plan, "detaching from the terminal");
            }
        }
        if plan.enter.is_some() && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return fail(plan, "no_new_privs");
        }
        for (resource, limit) in &plan.rlimits {
            if libc::setrlimit(*resource, limit) != 0 {
                return fail(plan, "setrlimit");
            }
        }
        if libc::chdir(plan.working_dir.as_ptr()) != 0 {
            return fail(plan, "chdir");
        }
        for (target, source) in plan.stdio.into_iter().enumerate() {
            if libc::dup2(source, target as libc::c_int) < 0 {
                return fail(plan, "dup2");
            }
        }
        // Raw system calls: glibc's set*id wrappers would change every thread of the
        // parent, whose memory (and thread list) this child shares.
        if let Some(id) = plan.identity {
            let id = libc::c_long::from(id);
            let no_groups = std::ptr::null::<libc::gid_t>();
            if libc::syscall(libc::SYS_setgroups, 0 as libc::c_long, no_groups) != 0
                || libc::syscall(libc::SYS_setresgid, id, id, id) != 0
                || libc::syscall(libc::SYS_setresuid, id, id, id) != 0
            {
                return fail(plan, "setresuid");
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // execvp's rules: keep looking past a missing or inaccessible candidate, and
        // report EACCES if any candidate had it.
        let mut saw_eacces = false;
        let mut error = libc::ENOENT;
        for candidate in &plan.candidates {
            libc::execve(candidate.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
            error = *libc::__errno_location();
            match error {
                libc::EACCES => saw_eacces = true,
                libc::ENOENT | libc::ENOTDIR => {}
                _ => break,
            }
        }
        plan.failed_step = "execve";
        plan.errno = if saw_eacces && matches!(error, libc::ENOENT | libc::ENOTDIR) {
            libc::EACCES
        } else {
            error
        };
        libc::_exit(127)
    }
}

impl SpawnedChild {
    pub(crate) fn id(&self) -> libc::pid_t {
        self.pid
    }

    /// Waits for the child to exit and collects its status.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        if self.reaped {
            return Err(io::Error::other("the child was already waited for"));
        }
        loop {
            let mut ready = self.pidfd.readable().await?;
            if let Some(status) = reap(self.pid)? {
                self.reaped = true;
                return Ok(status);
            }
            ready.clear_ready();
        }
    }
}

/// Collects `pid`'s exit status if it has exited.
fn reap(pid: libc::pid_t) -> io::Result<Option<ExitStatus>> {
    let mut status = 0;
    // SAFETY: waitpid on our own child with a valid status pointer.
    match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
        0 => Ok(None),
        reaped if reaped == pid => Ok(Some(ExitStatus::from_raw(status))),
        _ => Err(io::Error::last_os_error()),
    }
}

impl Drop for SpawnedChild {
    /// A child dropped before it was waited for (its run was aborted; the caller kills its
    /// process group) is reaped in the background rather than left a zombie.
    fn drop(&mut self) {
        if self.reaped || matches!(reap(self.pid), Ok(Some(_))) {
            return;
        }
        let pid = self.pid;
        std::thread::spawn(move || {
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid status pointer.
            unsafe { libc::waitpid(pid, &mut status, 0) };
        });
    }
}
