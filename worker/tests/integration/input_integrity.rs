//! No action can change what the worker's cache holds, whatever it does to its inputs.
//!
//! Each way of modifying a file is tried by one action on an input `f.txt` holding
//! `good`; then another action on the same worker reads the same input and must see
//! `good`, and every file in the cache must still hash to its name. The actions run as
//! the test's user (root in CI), who owns the cache: only the materialisation can keep
//! them apart.

use crate::common;

use common::{put_action, ActionSpec, Node, TestCas, TestRunner};
use kiln_store::{Digest, DigestFunction};

const ORIGINAL: &[u8] = b"good\n";

/// Ways an action may modify its input `f.txt` in place, as shell scripts. Each must
/// succeed (the action may change its own view), and none may reach the cache.
const MODIFICATIONS: &[(&str, &str)] = &[
    // The reproduction from the issue that found it: chmod, then rewrite through O_TRUNC.
    (
        "chmod and overwrite",
        "chmod u+w f.txt && echo evil > f.txt",
    ),
    ("truncate", "chmod u+w f.txt && truncate -s 0 f.txt"),
    (
        "write in place without truncating",
        "chmod u+w f.txt && printf evil | dd of=f.txt conv=notrunc status=none",
    ),
    ("append", "chmod u+w f.txt && echo evil >> f.txt"),
    ("chmod only (the view changes its mode)", "chmod 0755 f.txt"),
    ("rename over", "echo evil > new && mv -f new f.txt"),
    ("unlink and re-create", "rm -f f.txt && echo evil > f.txt"),
    (
        "hard link, then write through the link",
        "ln f.txt alias && chmod u+w alias && echo evil > alias",
    ),
    (
        "write through a shared memory mapping",
        "chmod u+w f.txt && \"$MMAP_WRITER\" f.txt",
    ),
];

/// The environment variable that turns this test binary into the mmap writer (below).
const MMAP_TARGET: &str = "KILN_TEST_MMAP_TARGET";

/// Not a test of its own: when an action runs this binary with `MMAP_TARGET` set, it maps
/// that file shared and writes through the mapping, as a tool that edits files in place
/// through mmap would. Run normally, it does nothing.
#[test]
fn mmap_writer() {
    let Ok(path) = std::env::var(MMAP_TARGET) else {
        return;
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open the input for writing");
    let len = file.metadata().unwrap().len() as usize;
    assert!(len > 0);
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh shared mapping of `len` bytes of an open file, written within its
    // bounds and unmapped before the file is closed.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED, "mmap");
        std::ptr::write_bytes(map.cast::<u8>(), b'X', len);
        assert_eq!(libc::msync(map, len, libc::MS_SYNC), 0);
        libc::munmap(map, len);
    }
}

/// A shell script that runs this test binary as the mmap writer on its first argument.
fn mmap_writer_script(dir: &std::path::Path) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let script = dir.join("mmap-writer.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n{MMAP_TARGET}=\"$1\" exec '{}' --exact input_integrity::mmap_writer --quiet --test-threads=1 >/dev/null\n",
            exe.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn action(script: &str, mmap_writer: &std::path::Path) -> ActionSpec {
    let mut spec = ActionSpec::shell(script);
    spec.environment
        .push(("MMAP_WRITER".into(), mmap_writer.display().to_string()));
    spec.inputs = vec![Node::File("f.txt", ORIGINAL.to_vec())];
    spec.output_files = vec!["f.txt".into()];
    spec
}

/// What `f.txt` held when the action ended, as uploaded: its bytes and executable bit.
async fn output_of(cas: &TestCas, runner: &TestRunner, action_digest: Digest) -> (Vec<u8>, bool) {
    let outcome = runner.run(action_digest).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let result = outcome.action_result.expect("an ActionResult");
    let stderr = cas.get(result.stderr_digest.as_ref().unwrap()).await;
    assert_eq!(
        result.exit_code,
        0,
        "stderr: {}",
        String::from_utf8_lossy(&stderr)
    );
    let file = result
        .output_files
        .iter()
        .find(|f| f.path == "f.txt")
        .expect("f.txt is an output");
    (
        cas.get(file.digest.as_ref().unwrap()).await,
        file.is_executable,
    )
}

/// Every blob in the worker's cache still hashes to the name it is filed under, and
/// keeps its variant's read-only mode.
fn assert_cache_intact(runner: &TestRunner) {
    use std::os::unix::fs::PermissionsExt;
    let mut checked = 0;
    for (variant, mode) in [("files", 0o444), ("executables", 0o555)] {
        for function in DigestFunction::ALL {
            let dir = runner
                .work_dir
                .path()
                .join("cache")
                .join(variant)
                .join(function.name());
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let entry = entry.unwrap();
                let bytes = std::fs::read(entry.path()).unwrap();
                let actual = Digest::of_bytes(function, &bytes);
                assert_eq!(
                    actual.hex(),
                    entry.file_name().to_str().unwrap(),
                    "cached blob {} was changed",
                    entry.path().display()
                );
                let found = entry.metadata().unwrap().permissions().mode() & 0o7777;
                assert_eq!(found, mode, "mode of {}", entry.path().display());
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "the cache holds nothing to check");
}

#[tokio::test]
async fn no_modification_of_an_input_reaches_the_cache() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Sha256).await?;
    let runner = TestRunner::new(&cas);
    let writer = mmap_writer_script(runner.work_dir.path());
    let reader = put_action(&cas, &action("cat f.txt > /dev/null", &writer)).await;
    for (name, script) in MODIFICATIONS {
        let modifier = put_action(&cas, &action(script, &writer)).await;
        let modified = output_of(&cas, &runner, modifier).await;
        assert_ne!(
            modified,
            (ORIGINAL.to_vec(), false),
            "{name}: the action's own view did not change"
        );
        assert_eq!(
            output_of(&cas, &runner, reader).await,
            (ORIGINAL.to_vec(), false),
            "{name}: the next action on the worker read changed bytes"
        );
        assert_cache_intact(&runner);
    }
    Ok(())
}

#[tokio::test]
async fn concurrent_modifiers_never_disturb_concurrent_readers() -> anyhow::Result<()> {
    let cas = TestCas::start(DigestFunction::Blake3).await?;
    let runner = TestRunner::new(&cas);
    let writer = mmap_writer_script(runner.work_dir.path());
    // The reader checks the bytes itself, from inside the action, while modifiers of the
    // same input run beside it.
    let reader = put_action(
        &cas,
        &action(
            "for i in 1 2 3 4 5; do [ \"$(cat f.txt)\" = good ] || exit 9; sleep 0.01; done",
            &writer,
        ),
    )
    .await;
    let mut modifiers = Vec::new();
    for (_, script) in MODIFICATIONS {
        modifiers.push(put_action(&cas, &action(script, &writer)).await);
    }
    for _round in 0..3 {
        let readers = (0..4).map(|_| output_of(&cas, &runner, reader));
        let writers = modifiers.iter().map(|m| output_of(&cas, &runner, *m));
        let (read, _) = tokio::join!(
            futures::future::join_all(readers),
            futures::future::join_all(writers)
        );
        for output in read {
            assert_eq!(output, (ORIGINAL.to_vec(), false));
        }
        assert_cache_intact(&runner);
    }
    Ok(())
}
