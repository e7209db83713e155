//! The bubblewrap sandbox an action runs in, and the host uid it runs as.
//!
//! Inside, the action sees a root of its own holding the host's system directories
//! read-only, private `/tmp`, `/dev` and `/proc`, and its own directory, the one writable
//! place; it has new PID, IPC, UTS, cgroup and network namespaces (the host's network
//! only with `network=on`), a new session, and dies with the worker.
//!
//! A worker running as root gives each action a host uid of its own, one that owns
//! nothing but the action's directory, so root-only files in the system directories
//! (`/etc/shadow`, keys, a config file holding the join token) stay unreadable, and
//! RLIMIT_NPROC, counted per uid, bounds this action alone. Where root may mount (a host),
//! bwrap builds the sandbox as root, so it reaches the action's directory wherever the
//! work dir is, and `setpriv` starts the command as the uid without capabilities;
//! elsewhere (a container) bwrap starts as the uid, in a user namespace. A worker running
//! as another user cannot change uid: bwrap then makes a user namespace in which the
//! action is uid 65534, mapped to the worker's.
//!
//! Where bwrap builds sandboxes as root, actions on the host's system directories without
//! the network run in warm sandboxes instead, built once and entered per action
//! (`warm_pool`).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::WorkerError;

mod image_root;
mod uid_pool;
mod warm_pool;

use image_root::HostSetpriv;
pub(crate) use uid_pool::UidLease;
use uid_pool::UidPool;
pub(crate) use warm_pool::WarmPool;

/// The host's system directories an action sees, read-only, where they exist. Nothing
/// else of the host is there: not `/home`, `/root`, `/var`, `/srv`, nor wherever the
/// worker keeps its cache, its data directory and other actions' directories.
const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
];

/// The uid and gid an action has inside a user namespace (`nobody`).
const UID_IN_USER_NAMESPACE: &str = "65534";

/// A working `bwrap`, and how actions get a uid of their own.
pub(crate) struct Bubblewrap {
    path: PathBuf,
    /// The arguments that show the system directories: looked up once, not per action.
    system_dirs: Vec<OsString>,
    /// How, and from which pool of host uids, for a worker running as root.
    own_uid: Option<(OwnUid, UidPool)>,
    /// Warm sandboxes, where bwrap runs as root (`OwnUid::Setpriv`).
    warm: Option<Arc<WarmPool>>,
}

/// How a root worker starts an action as a host uid of its own.
#[derive(Clone, Debug)]
enum OwnUid {
    /// bwrap builds the sandbox as root, without a user namespace, and this `setpriv`
    /// starts the command as the uid with no capabilities. Needs CAP_SYS_ADMIN (a host,
    /// or a privileged container).
    Setpriv(PathBuf, Option<HostSetpriv>),
    /// bwrap starts as the uid and maps it to 65534 in a user namespace: for root without
    /// CAP_SYS_ADMIN (a container whose seccomp profile allows user namespaces). The
    /// uid must then be able to reach the action's directory (every directory above it
    /// searchable by others).
    UserNamespace,
}

impl Bubblewrap {
    /// Finds `bwrap` on PATH and checks that a trial action runs in a sandbox here and can
    /// write its directory. As root, it tries setpriv, then a user namespace; as another
    /// user, a user namespace of that user's.
    pub(crate) fn find(uid_base: u32) -> Result<Self, String> {
        let path = on_path("bwrap").ok_or("bwrap is not installed")?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let bubblewrap = Bubblewrap {
                path,
                system_dirs: system_dir_args(),
                own_uid: None,
                warm: None,
            };
            return bubblewrap
                .try_once()
                .map(|()| bubblewrap)
                .map_err(|reason| format!("bwrap cannot build a sandbox here: {reason}"));
        }
        let mut failures = Vec::new();
        let ways = on_path("setpriv")
            .map(|setpriv| {
                // Inside an image, setpriv needs the host's loader; without one, image
                // actions fail with a sandbox error and host actions are unaffected.
                let in_image = HostSetpriv::new(&setpriv)
                    .inspect_err(
                        |e| tracing::warn!(error = %e, "image actions cannot drop to their uid"),
                    )
                    .ok();
                OwnUid::Setpriv(setpriv, in_image)
            })
            .into_iter()
            .chain([OwnUid::UserNamespace]);
        let system_dirs = system_dir_args();
        for way in ways {
            let warm = matches!(way, OwnUid::Setpriv(..))
                .then(|| WarmPool::new(path.clone(), system_dirs.clone(), UidPool::new(uid_base)))
                .map(Arc::new);
            let bubblewrap = Bubblewrap {
                path: path.clone(),
                system_dirs: system_dirs.clone(),
                own_uid: Some((way.clone(), UidPool::new(uid_base))),
                warm,
            };
            match bubblewrap.try_once() {
                Ok(()) => return Ok(bubblewrap.without_warm_pool_unless_it_works()),
                Err(reason) => failures.push(format!("{way:?}: {reason}")),
            }
        }
        Err(format!(
            "bwrap cannot build a sandbox here as uid {uid_base} ({}); it needs \
             CAP_SYS_ADMIN with setpriv (util-linux) installed, or user namespaces",
            failures.join("; ")
        ))
    }

    /// Keeps the warm pool only if a trial sandbox can be built from it; otherwise each
    /// action gets a sandbox of its own, which `try_once` has just shown to work.
    fn without_warm_pool_unless_it_works(mut self) -> Self {
        if let Some(error) = self.warm.as_ref().and_then(|warm| warm.trial().err()) {
            tracing::warn!(
                %error,
                "warm sandboxes cannot be built here; each action gets a sandbox of its own"
            );
            self.warm = None;
        }
        self
    }

    /// Runs `touch` in a sandbox around a fresh temporary directory, as an action would.
    fn try_once(&self) -> Result<(), String> {
        static TRIALS: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kiln-sandbox-trial-{}-{}",
            std::process::id(),
            TRIALS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let uid = self.lease_uid().map_err(|e| e.to_string())?;
        let outcome = (|| {
            let uid = uid.as_ref().map(UidLease::uid);
            if let Some(uid) = uid {
                hand_over(&dir, uid).map_err(|e| e.to_string())?;
            }
            let argv = self
                .argv(
                    &dir,
                    &dir,
                    false,
                    uid,
                    None,
                    ["touch".as_ref(), "trial".as_ref()].into_iter(),
                )
                .map_err(|e| e.to_string())?;
            let mut command = std::process::Command::new(&argv[0]);
            if let Some(uid) = self.starts_as(uid) {
                // std drops root's supplementary groups too.
                command.uid(uid).gid(uid);
            }
            let output = command
                .args(&argv[1..])
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .map_err(|e| format!("cannot run it: {e}"))?;
            if output.status.success() && dir.join("trial").exists() {
                return Ok(());
            }
            Err(format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        })();
        let _ = std::fs::remove_dir_all(&dir);
        outcome
    }

    /// bwrap's argv around `command`, for an action of host uid `uid` when one is given,
    /// in the host's system directories or, with `image_root`, in that root filesystem.
    pub(crate) fn argv<'a>(
        &self,
        exec_root: &Path,
        working_dir: &Path,
        network: bool,
        uid: Option<u32>,
        image_root: Option<&Path>,
        command: impl Iterator<Item = &'a OsStr>,
    ) -> Result<Vec<OsString>, WorkerError> {
        let setpriv = match (&self.own_uid, uid) {
            (Some((OwnUid::Setpriv(path, in_image), _)), Some(uid)) => Some((path, in_image, uid)),
            _ => None,
        };
        let mut argv = vec![self.path.clone().into_os_string()];
        let mut setpriv_start: Vec<OsString> = Vec::new();
        let (sandbox_root, sandbox_dir) = match image_root {
            None => {
                argv.extend(self.system_dirs.iter().cloned());
                if let Some((path, _, _)) = setpriv {
                    setpriv_start.push(path.clone().into_os_string());
                }
                (exec_root.to_path_buf(), working_dir.to_path_buf())
            }
            Some(root) => {
                argv.extend(image_root::root_args(root).map_err(|e| {
                    WorkerError::SandboxSetup(format!(
                        "reading the image root {}: {e}",
                        root.display()
                    ))
                })?);
                if let Some((_, in_image, _)) = setpriv {
                    let host = in_image.as_ref().ok_or_else(|| {
                        WorkerError::SandboxSetup(
                            "setpriv cannot run inside an image here (no host loader found)".into(),
                        )
                    })?;
                    argv.extend(host.binds().iter().cloned());
                    setpriv_start.extend(host.prefix().iter().cloned());
                }
                let inside = PathBuf::from(image_root::EXEC_ROOT);
                let relative = working_dir.strip_prefix(exec_root).unwrap_or(Path::new(""));
                (inside.clone(), inside.join(relative))
            }
        };
        argv.extend(bubblewrap_args(
            exec_root,
            &sandbox_root,
            &sandbox_dir,
            BwrapUse::Action {
                network,
                user_namespace: setpriv.is_none(),
            },
        ));
        argv.push("--".into());
        if let Some((_, _, uid)) = setpriv {
            argv.extend(setpriv_start);
            argv.extend(
                [
                    format!("--reuid={uid}"),
                    format!("--regid={uid}"),
                    "--clear-groups".into(),
                    "--inh-caps=-all".into(),
                    "--bounding-set=-all".into(),
                    "--".into(),
                ]
                .map(OsString::from),
            );
        }
        argv.extend(command.map(OsString::from));
        Ok(argv)
    }

    /// The uid bwrap itself must start as, for an action of host uid `uid`: the action's
    /// when bwrap maps it into a user namespace; none when bwrap starts as the worker.
    pub(crate) fn starts_as(&self, uid: Option<u32>) -> Option<u32> {
        match self.own_uid {
            Some((OwnUid::UserNamespace, _)) => uid,
            _ => None,
        }
    }

    /// A host uid no other running action has, given back when the lease is dropped;
    /// none when the worker is not root (its actions then run as its own uid).
    pub(crate) fn lease_uid(&self) -> Result<Option<UidLease>, WorkerError> {
        self.own_uid
            .as_ref()
            .map(|(_, pool)| pool.lease())
            .transpose()
    }

    /// How actions are confined, for the worker's start-up log.
    pub(crate) fn describe(&self) -> &'static str {
        match (&self.own_uid, &self.warm) {
            (Some(_), Some(_)) => "warm sandboxes, a host uid each (root on a host)",
            (Some((OwnUid::Setpriv(..), _)), None) => {
                "bwrap as root, setpriv to a host uid per action"
            }
            (Some((OwnUid::UserNamespace, _)), _) => {
                "bwrap as a host uid per action, in a user namespace (root without CAP_SYS_ADMIN)"
            }
            (None, _) => "bwrap in a user namespace of the worker's uid (not root)",
        }
    }

    /// The warm sandboxes, where actions can use them.
    pub(crate) fn warm_pool(&self) -> Option<&Arc<WarmPool>> {
        self.warm.as_ref()
    }
}

fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Gives `dir` and everything in it to `uid` (and the gid of the same number), so that
/// the action can write its own directory and nothing else. Symlinks are changed, never
/// followed. Nothing runs in the directory yet, so nothing can swap an entry meanwhile.
pub(crate) fn hand_over(dir: &Path, uid: u32) -> Result<(), WorkerError> {
    let give = |path: &Path| {
        std::os::unix::fs::lchown(path, Some(uid), Some(uid)).map_err(WorkerError::io(format!(
            "giving {} to the action",
            path.display()
        )))
    };
    give(dir)?;
    let listing = || WorkerError::io("listing the action's directory");
    for entry in std::fs::read_dir(dir).map_err(listing())? {
        let entry = entry.map_err(listing())?;
        if entry.file_type().map_err(listing())?.is_dir() {
            hand_over(&entry.path(), uid)?;
        } else {
            give(&entry.path())?;
        }
    }
    Ok(())
}

/// The arguments that show the host's system directories read-only, as they are on this
/// host (which exist, which are links).
fn system_dir_args() -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&OsStr]| args.extend(items.iter().map(|i| i.to_os_string()));
    for dir in SYSTEM_DIRS {
        let path = Path::new(dir);
        match std::fs::symlink_metadata(path) {
            // Merged /usr: /bin is a link to usr/bin; keep it a link.
            Ok(meta) if meta.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(path) {
                    push(&["--symlink".as_ref(), target.as_os_str(), path.as_os_str()]);
                }
            }
            Ok(_) => push(&["--ro-bind".as_ref(), path.as_os_str(), path.as_os_str()]),
            Err(_) => {}
        }
    }
    args
}

/// How a sandbox's bubblewrap command line is used.
#[derive(Clone, Copy)]
enum BwrapUse<'a> {
    /// Around one action, with a fresh tmpfs at `/tmp`.
    Action { network: bool, user_namespace: bool },
    /// A warm sandbox, with this host directory at `/tmp`: no network, no user
    /// namespace, and no tie to the thread that started it.
    Warm(&'a Path),
}

/// The rest of the sandbox's arguments, after the root's and before `--` and the
/// command: `exec_root` appears at `sandbox_root`, and the command starts in `sandbox_dir`.
fn bubblewrap_args(
    exec_root: &Path,
    sandbox_root: &Path,
    sandbox_dir: &Path,
    sandbox: BwrapUse<'_>,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&OsStr]| args.extend(items.iter().map(|i| i.to_os_string()));
    push(&[
        "--dev".as_ref(),
        "/dev".as_ref(),
        "--proc".as_ref(),
        "/proc".as_ref(),
    ]);
    match sandbox {
        // Built by root, for an action of another uid: open to all, sticky.
        BwrapUse::Action { .. } => push(&[
            "--perms".as_ref(),
            "1777".as_ref(),
            "--tmpfs".as_ref(),
            "/tmp".as_ref(),
        ]),
        BwrapUse::Warm(tmp) => push(&["--bind".as_ref(), tmp.as_os_str(), "/tmp".as_ref()]),
    }
    // bwrap would make the directories above the action's with the host's modes, which
    // may close them to the action's uid (a 0700 home, a temporary directory): made first,
    // open to all (they hold nothing but the way to the action's directory).
    let mut ancestors: Vec<&Path> = sandbox_root
        .ancestors()
        .skip(1)
        .filter(|dir| !provided_by_sandbox(dir))
        .collect();
    ancestors.reverse();
    for dir in ancestors {
        push(&[
            "--perms".as_ref(),
            "0755".as_ref(),
            "--dir".as_ref(),
            dir.as_os_str(),
        ]);
    }
    push(&[
        "--bind".as_ref(),
        exec_root.as_os_str(),
        sandbox_root.as_os_str(),
        // The sandbox's root is a tmpfs of bwrap's; read-only, so /tmp and the action's
        // directory (mounts of their own) are the only writable places.
        "--remount-ro".as_ref(),
        "/".as_ref(),
        "--unshare-pid".as_ref(),
        "--unshare-ipc".as_ref(),
        "--unshare-uts".as_ref(),
        "--unshare-cgroup-try".as_ref(),
    ]);
    match sandbox {
        BwrapUse::Action {
            network,
            user_namespace,
        } => {
            push(&["--new-session".as_ref(), "--die-with-parent".as_ref()]);
            if user_namespace {
                push(&[
                    "--unshare-user".as_ref(),
                    "--uid".as_ref(),
                    UID_IN_USER_NAMESPACE.as_ref(),
                    "--gid".as_ref(),
                    UID_IN_USER_NAMESPACE.as_ref(),
                ]);
            }
            if !network {
                push(&["--unshare-net".as_ref()]);
            }
        }
        // The holder's end is tied to a pipe, not to the thread that started it (which
        // --die-with-parent would be); actions entering it start sessions of their own.
        BwrapUse::Warm(_) => push(&["--unshare-net".as_ref()]),
    }
    push(&["--chdir".as_ref(), sandbox_dir.as_os_str()]);
    args
}

/// Whether the sandbox has `dir` already, where bwrap must not make or change it: the
/// root, the mounts it makes (`/tmp`, `/dev`, `/proc`; what is below `/tmp` is not
/// there), and all of the read-only system directories.
fn provided_by_sandbox(dir: &Path) -> bool {
    ["/", "/tmp", "/dev", "/proc"]
        .iter()
        .any(|mount| dir == Path::new(mount))
        || SYSTEM_DIRS.iter().any(|system| dir.starts_with(system))
}

/// bwrap's own complaint, when it could not set the sandbox up, or setpriv's, when it
/// could not take the action's uid: either exits with 1 before the command ran, its
/// message first on stderr as `bwrap: …` or `setpriv: …`. An action that prints such a
/// line and exits 1 itself would be taken for one, and tried again: a retry, never a
/// wrong result.
pub(crate) fn setup_failure(stderr: &File) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let mut start = [0u8; 512];
    let read = stderr.read_at(&mut start, 0).ok()?;
    let text = String::from_utf8_lossy(&start[..read]);
    let line = text.lines().next()?;
    // A command that is not there (in the image, say) is the action's own failure.
    let command_missing =
        line.starts_with("bwrap: execvp ") || line.starts_with("setpriv: failed to execute");
    ((line.starts_with("bwrap: ") || line.starts_with("setpriv: ")) && !command_missing)
        .then(|| line.to_string())
}
