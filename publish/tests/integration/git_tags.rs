//! `--tags-from-git` and the provenance labels, read from real temporary git repositories.

use std::path::Path;
use std::process::Command;

use kiln_publish::GitMetadata;

fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "kiln test")
        .env("GIT_AUTHOR_EMAIL", "test@kiln.invalid")
        .env("GIT_COMMITTER_NAME", "kiln test")
        .env("GIT_COMMITTER_EMAIL", "test@kiln.invalid")
        .env("GIT_AUTHOR_DATE", "@1700000000 +0000")
        .env("GIT_COMMITTER_DATE", "@1700000000 +0000")
        .output()
        .expect("git runs (these tests need git: apt-get install -y git)");
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

fn repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    git(dir.path(), &["init", "-q", "-b", "main"]);
    std::fs::write(dir.path().join("file"), "one\n").unwrap();
    git(dir.path(), &["add", "file"]);
    git(dir.path(), &["commit", "-q", "-m", "first"]);
    dir
}

#[test]
#[ignore = "needs git; `cargo test -- --ignored` runs it (.ci/run does)"]
fn semver_tag_on_main() {
    let dir = repo();
    git(dir.path(), &["tag", "v1.2.3"]);
    git(dir.path(), &["tag", "not-a-version"]);
    git(
        dir.path(),
        &[
            "remote",
            "add",
            "origin",
            "https://ci:token@git.example/org/app.git",
        ],
    );
    let sha = git(dir.path(), &["rev-parse", "HEAD"]);
    let meta = GitMetadata::read(dir.path()).unwrap();
    assert_eq!(meta.commit, sha);
    assert_eq!(meta.commit_time, 1_700_000_000);
    assert_eq!(meta.branch.as_deref(), Some("main"));
    let short = &sha[..7];
    assert_eq!(
        meta.derive_tags(None),
        vec![
            "v1.2.3".to_string(),
            short.to_string(),
            format!("main-{short}")
        ]
    );
    let provenance = meta.provenance(None);
    assert_eq!(provenance.created(), "2023-11-14T22:13:20Z");
    assert_eq!(provenance.revision.as_deref(), Some(sha.as_str()));
    assert_eq!(provenance.version.as_deref(), Some("v1.2.3"));
    assert_eq!(
        provenance.source.as_deref(),
        Some("https://git.example/org/app.git"),
        "credentials never reach the labels"
    );
    assert_eq!(
        meta.provenance(Some(5)).created_epoch,
        5,
        "SOURCE_DATE_EPOCH wins"
    );
}

#[test]
#[ignore = "needs git; `cargo test -- --ignored` runs it (.ci/run does)"]
fn unprefixed_semver_and_prereleases() {
    let dir = repo();
    git(dir.path(), &["tag", "2.0.0-rc.1"]);
    git(dir.path(), &["tag", "v1.9.0"]);
    let meta = GitMetadata::read(dir.path()).unwrap();
    let tags = meta.derive_tags(None);
    assert_eq!(
        &tags[..2],
        &["v1.9.0".to_string(), "v2.0.0-rc.1".to_string()]
    );
    assert_eq!(meta.version().as_deref(), Some("v2.0.0-rc.1"));
}

#[test]
#[ignore = "needs git; `cargo test -- --ignored` runs it (.ci/run does)"]
fn feature_branch_is_sanitised() {
    let dir = repo();
    git(dir.path(), &["tag", "v1.0.0"]);
    git(dir.path(), &["checkout", "-q", "-b", "feature/x"]);
    std::fs::write(dir.path().join("file"), "two\n").unwrap();
    git(dir.path(), &["commit", "-q", "-am", "second"]);
    let short = git(dir.path(), &["rev-parse", "--short=7", "HEAD"]);
    let meta = GitMetadata::read(dir.path()).unwrap();
    assert_eq!(meta.branch.as_deref(), Some("feature/x"));
    assert!(
        meta.semver_tags.is_empty(),
        "the tag is on the parent, not HEAD"
    );
    assert_eq!(
        meta.derive_tags(None),
        vec![short.clone(), format!("feature-x-{short}")]
    );
    assert_eq!(meta.provenance(None).version, None);
}

#[test]
#[ignore = "needs git; `cargo test -- --ignored` runs it (.ci/run does)"]
fn detached_head_has_no_branch_tag() {
    let dir = repo();
    let sha = git(dir.path(), &["rev-parse", "HEAD"]);
    git(dir.path(), &["checkout", "-q", "--detach", "HEAD"]);
    let meta = GitMetadata::read(dir.path()).unwrap();
    assert_eq!(meta.branch, None);
    assert_eq!(meta.source_url, None);
    assert_eq!(meta.derive_tags(None), vec![sha[..7].to_string()]);
    // CI names the branch itself when it checks out a detached HEAD.
    assert_eq!(
        meta.derive_tags(Some("release/2.x")),
        vec![sha[..7].to_string(), format!("release-2.x-{}", &sha[..7])]
    );
}

#[test]
#[ignore = "needs git; `cargo test -- --ignored` runs it (.ci/run does)"]
fn outside_a_repository_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = GitMetadata::read(dir.path()).unwrap_err();
    assert!(err.to_string().contains("git"), "{err}");
}
