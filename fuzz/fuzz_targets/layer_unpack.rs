//! OCI layer unpacking in kiln-worker (`container_image::unpack`): whatever the layers
//! hold (`..`, absolute names, symlinks and hard links out, whiteouts of `.` and `..`,
//! gzip or zstd), nothing outside the root is created, changed or removed. Each input
//! unpacks into a fresh directory beside a victim directory, checked afterwards.
#![no_main]

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use arbitrary::Arbitrary;
use kiln_fuzz::make_removable;
use kiln_worker::fuzzing::{unpack_layers, Limits};
use libfuzzer_sys::fuzz_target;
use tar::{EntryType, Header};

const LIMITS: Limits = Limits {
    bytes: 64 << 10,
    entries: 256,
};
const NAMES: [&str; 4] = ["a", "b", "etc", "victim"];
const VICTIM_TEXT: &[u8] = b"must stay";

/// One component of an entry's name or a link's target.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Part {
    Name(u8),
    Dot,
    DotDot,
    Empty,
    /// `.wh.NAME`: removes NAME from lower layers.
    Whiteout(u8),
    /// `.wh..wh..opq`: empties the directory of lower layers' entries.
    Opaque,
    /// `.wh..` and `.wh...`: whiteouts of `.` and `..`.
    WhiteoutDot,
    WhiteoutDotDot,
    /// The absolute path of the directory holding the root (and the victim).
    Outer,
}

#[derive(Arbitrary, Debug)]
enum Kind {
    File { contents: Vec<u8> },
    Directory,
    Symlink(Vec<Part>),
    HardLink(Vec<Part>),
    Fifo,
}

#[derive(Arbitrary, Debug)]
struct Entry {
    absolute: bool,
    path: Vec<Part>,
    kind: Kind,
    mode: u16,
}

#[derive(Arbitrary, Debug)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Arbitrary, Debug)]
struct Layer {
    compression: Compression,
    entries: Vec<Entry>,
}

fn render(parts: &[Part], absolute: bool, outer: &Path) -> String {
    let text: Vec<String> = parts
        .iter()
        .map(|part| match *part {
            Part::Name(n) => NAMES[n as usize % NAMES.len()].to_string(),
            Part::Dot => ".".into(),
            Part::DotDot => "..".into(),
            Part::Empty => String::new(),
            Part::Whiteout(n) => format!(".wh.{}", NAMES[n as usize % NAMES.len()]),
            Part::Opaque => ".wh..wh..opq".into(),
            Part::WhiteoutDot => ".wh..".into(),
            Part::WhiteoutDotDot => ".wh...".into(),
            Part::Outer => outer.display().to_string(),
        })
        .collect();
    let joined = text.join("/");
    if absolute {
        format!("/{joined}")
    } else {
        joined
    }
}

/// A raw tar header: `tar::Builder` refuses `..` and absolute names, which a hostile
/// layer has.
fn header(name: &str, kind: EntryType, size: u64, mode: u16, link: &str) -> Option<Header> {
    let mut header = Header::new_gnu();
    let old = header.as_old_mut();
    if name.len() > old.name.len() || link.len() > old.linkname.len() {
        return None;
    }
    old.name[..name.len()].copy_from_slice(name.as_bytes());
    old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode as u32);
    header.set_cksum();
    Some(header)
}

fn tar_bytes(layer: &Layer, outer: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in &layer.entries {
        let name = render(&entry.path, entry.absolute, outer);
        let (kind, data, link) = match &entry.kind {
            Kind::File { contents } => (EntryType::Regular, contents.as_slice(), String::new()),
            Kind::Directory => (EntryType::Directory, &[][..], String::new()),
            Kind::Symlink(target) => (EntryType::Symlink, &[][..], render(target, false, outer)),
            Kind::HardLink(target) => (EntryType::Link, &[][..], render(target, false, outer)),
            Kind::Fifo => (EntryType::Fifo, &[][..], String::new()),
        };
        let Some(header) = header(&name, kind, data.len() as u64, entry.mode, &link) else {
            continue;
        };
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn compressed(layer: &Layer, tar: Vec<u8>) -> Vec<u8> {
    match layer.compression {
        Compression::None => tar,
        Compression::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&tar).unwrap();
            gz.finish().unwrap()
        }
        Compression::Zstd => zstd::bulk::compress(&tar, 1).unwrap(),
    }
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{} is gone: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// No setuid or setgid bit survives unpacking, anywhere under `dir`.
fn check_modes(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.path().symlink_metadata().unwrap();
        if !meta.file_type().is_symlink() {
            assert_eq!(meta.mode() & 0o6000, 0, "{}", entry.path().display());
        }
        if meta.is_dir() {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
            check_modes(&entry.path());
        }
    }
}

fuzz_target!(|layers: Vec<Layer>| {
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("root");
    let victim = outer.path().join("victim");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("file"), VICTIM_TEXT).unwrap();
    let victim_mode = victim.join("file").metadata().unwrap().mode();
    let files: Vec<File> = layers
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            let path = outer.path().join(format!("layer{i}"));
            std::fs::write(&path, compressed(layer, tar_bytes(layer, outer.path()))).unwrap();
            File::open(path).unwrap()
        })
        .collect();
    for i in 0..layers.len() {
        std::fs::remove_file(outer.path().join(format!("layer{i}"))).unwrap();
    }

    let result = unpack_layers(&root, files, LIMITS);
    if let Ok(bytes) = result {
        assert!(bytes <= LIMITS.bytes);
    }
    let expected: BTreeSet<String> = ["root", "victim"].map(String::from).into();
    assert_eq!(names(outer.path()), expected, "outside the root changed");
    assert_eq!(names(&victim), ["file".to_string()].into());
    let file = victim.join("file");
    assert_eq!(std::fs::read(&file).unwrap(), VICTIM_TEXT);
    let meta = file.metadata().unwrap();
    assert_eq!(meta.nlink(), 1, "the victim was hard-linked");
    assert_eq!(meta.mode(), victim_mode, "the victim's mode changed");
    check_modes(&root);
    make_removable(&root);
});
