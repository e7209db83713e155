//! The same content gives the same layer, whatever the files' mtimes, owners, modes
//! (beyond the execute bit) and creation order on disk.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use kiln_publish::{build_layer, Compression};

const LONG_DIR: &str = "a-directory-name-that-is-long-enough/to-push-the-whole-path-past-one-hundred-bytes/which-needs-gnu-long-names";

/// Writes the test tree; `variant` changes everything that must not matter.
fn write_tree(root: &Path, variant: u32) {
    let files: Vec<(&str, &[u8], bool)> = vec![
        ("bin/app", b"#!/bin/sh\necho hello\n", true),
        ("etc/app/config.toml", b"port = 8080\n", false),
        ("README", b"readme\n", false),
        ("z-last", b"", false),
    ];
    let long_file = format!("{LONG_DIR}/file.txt");
    let mut all: Vec<(String, Vec<u8>, bool)> = files
        .into_iter()
        .map(|(p, c, x)| (p.to_string(), c.to_vec(), x))
        .collect();
    all.push((long_file, b"long\n".to_vec(), false));
    if variant == 1 {
        all.reverse();
    }
    for (path, content, executable) in &all {
        let full = root.join(path);
        fs::create_dir_all(full.parent().unwrap()).unwrap();
        fs::write(&full, content).unwrap();
        let mode = match (executable, variant) {
            (true, 0) => 0o755,
            (true, _) => 0o700,
            (false, 0) => 0o644,
            (false, _) => 0o600,
        };
        fs::set_permissions(&full, fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::create_dir_all(root.join("var/empty")).unwrap();
    std::os::unix::fs::symlink("bin/app", root.join("app-link")).unwrap();
    // A fifo: not something an image can carry; it must be left out, not fail the build.
    let status = std::process::Command::new("mkfifo")
        .arg(root.join("pipe"))
        .status()
        .expect("mkfifo runs");
    assert!(status.success());

    if variant == 1 {
        let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        for entry in walk(root) {
            if entry.is_file() {
                fs::File::options()
                    .write(true)
                    .open(&entry)
                    .unwrap()
                    .set_modified(when)
                    .unwrap();
            }
            // Another owner: only root may chown, and these tests run as root in CI.
            if let Err(e) = std::os::unix::fs::lchown(&entry, Some(1234), Some(5678)) {
                assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
            }
        }
        fs::set_permissions(root.join("etc"), fs::Permissions::from_mode(0o700)).unwrap();
    }
}

fn walk(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

#[test]
fn same_content_gives_the_same_digests() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    write_tree(a.path(), 0);
    write_tree(b.path(), 1);
    for compression in [Compression::Gzip, Compression::Zstd] {
        let first = build_layer(a.path(), compression, 1_700_000_000).unwrap();
        let second = build_layer(b.path(), compression, 1_700_000_000).unwrap();
        assert_eq!(first.digest, second.digest, "{compression:?}");
        assert_eq!(first.diff_id, second.diff_id);
        assert_eq!(first.size, second.size);
        assert_eq!(first.size, fs::metadata(first.path()).unwrap().len());
        assert_eq!(first.media_type(), compression.media_type());
        // The digest is really the file's.
        let bytes = fs::read(first.path()).unwrap();
        assert_eq!(
            first.digest.to_string(),
            format!(
                "sha256:{}",
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
            )
        );
    }
    let gzip = build_layer(a.path(), Compression::Gzip, 1_700_000_000).unwrap();
    let zstd = build_layer(a.path(), Compression::Zstd, 1_700_000_000).unwrap();
    assert_eq!(gzip.diff_id, zstd.diff_id, "one tar, two compressions");
    assert_ne!(gzip.digest, zstd.digest);
}

#[test]
fn content_mtime_and_exec_bit_change_the_digest() {
    let a = tempfile::tempdir().unwrap();
    write_tree(a.path(), 0);
    let base = build_layer(a.path(), Compression::Gzip, 0).unwrap();
    let later = build_layer(a.path(), Compression::Gzip, 1).unwrap();
    assert_ne!(
        base.diff_id, later.diff_id,
        "the fixed mtime is part of the content"
    );

    fs::set_permissions(a.path().join("README"), fs::Permissions::from_mode(0o755)).unwrap();
    let executable = build_layer(a.path(), Compression::Gzip, 0).unwrap();
    assert_ne!(base.diff_id, executable.diff_id);

    fs::write(a.path().join("README"), b"changed\n").unwrap();
    let changed = build_layer(a.path(), Compression::Gzip, 0).unwrap();
    assert_ne!(executable.diff_id, changed.diff_id);
}

#[test]
fn tar_entries_are_normalised() {
    let a = tempfile::tempdir().unwrap();
    write_tree(a.path(), 1);
    let layer = build_layer(a.path(), Compression::Gzip, 1_234_567).unwrap();
    let bytes = fs::read(layer.path()).unwrap();
    // gzip header: no FNAME flag, mtime 0.
    assert_eq!(&bytes[..3], &[0x1f, 0x8b, 8]);
    assert_eq!(bytes[3], 0, "no optional gzip header fields");
    assert_eq!(&bytes[4..8], &[0, 0, 0, 0], "gzip mtime is zero");

    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(bytes.as_slice())
        .read_to_end(&mut tar)
        .unwrap();
    assert_eq!(
        layer.diff_id.to_string(),
        format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&tar))
        )
    );
    let mut archive = tar::Archive::new(tar.as_slice());
    let mut seen = Vec::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let header = entry.header();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        assert_eq!(header.mtime().unwrap(), 1_234_567, "{path}");
        assert_eq!(header.uid().unwrap(), 0, "{path}");
        assert_eq!(header.gid().unwrap(), 0, "{path}");
        assert_eq!(header.username_bytes(), Some(&b""[..]), "{path}");
        assert_eq!(header.groupname_bytes(), Some(&b""[..]), "{path}");
        let mode = header.mode().unwrap();
        match header.entry_type() {
            tar::EntryType::Directory => assert_eq!(mode, 0o755, "{path}"),
            tar::EntryType::Symlink => {
                assert_eq!(path, "app-link");
                assert_eq!(
                    entry.link_name().unwrap().unwrap().to_str(),
                    Some("bin/app")
                );
            }
            tar::EntryType::Regular => {
                let expected = if path == "bin/app" { 0o755 } else { 0o644 };
                assert_eq!(mode, expected, "{path}");
            }
            other => panic!("unexpected entry type {other:?} for {path}"),
        }
        seen.push(path);
    }
    let long_file = format!("{LONG_DIR}/file.txt");
    assert!(seen.contains(&long_file), "long names survive: {seen:?}");
    assert!(!seen.iter().any(|p| p == "pipe"), "fifos are left out");
    assert_eq!(seen.len(), layer.entries);
    // Parents before children, siblings sorted.
    let position = |p: &str| {
        seen.iter()
            .position(|s| s.trim_end_matches('/') == p)
            .unwrap()
    };
    assert!(position("bin") < position("bin/app"));
    assert!(position("README") < position("app-link"));
    assert!(position("app-link") < position("bin"));
    assert!(position("var") < position("z-last"));
}

#[test]
fn a_missing_directory_is_a_clear_error() {
    let err = build_layer(Path::new("/nonexistent/kiln"), Compression::Gzip, 0).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/kiln"), "{err}");
}
