//! What it costs a worker to materialise inputs as copies instead of hardlinks.
//!
//! The worker copies each input file out of its blob cache (`std::fs::copy`) so that no
//! action can write through to the cache. This measures that call against
//! `std::fs::hard_link` on the same filesystem, for many small files and for a few large
//! ones, interleaved over several rounds so that both see the same machine.
//!
//! `cargo run --release -p kiln-loadtests --bin materialise-cost -- --dir /path/on/the/worker/fs`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Where to create the files (the filesystem of the worker's work dir).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Files in the small-file case.
    #[arg(long, default_value_t = 2000)]
    small_files: usize,
    /// Bytes per small file.
    #[arg(long, default_value_t = 4096)]
    small_bytes: usize,
    /// Files in the large-file case.
    #[arg(long, default_value_t = 4)]
    large_files: usize,
    /// Bytes per large file.
    #[arg(long, default_value_t = 64 << 20)]
    large_bytes: usize,
    /// Interleaved rounds; the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[derive(Clone, Copy)]
enum Method {
    HardLink,
    Copy,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::HardLink => "hard_link",
            Method::Copy => "copy",
        }
    }

    fn place(self, source: &Path, dest: &Path) -> std::io::Result<()> {
        match self {
            Method::HardLink => std::fs::hard_link(source, dest),
            Method::Copy => std::fs::copy(source, dest).map(|_| ()),
        }
    }
}

/// Places every source into a fresh directory, as one action's materialisation would,
/// and returns the time it took (the clean-up afterwards is not counted).
fn materialise(method: Method, sources: &[PathBuf], scratch: &Path) -> Duration {
    let dest = scratch.join(format!("action-{}", method.name()));
    std::fs::create_dir(&dest).unwrap();
    let start = Instant::now();
    for (i, source) in sources.iter().enumerate() {
        method.place(source, &dest.join(i.to_string())).unwrap();
    }
    let took = start.elapsed();
    std::fs::remove_dir_all(&dest).unwrap();
    took
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn measure(label: &str, count: usize, bytes: usize, rounds: usize, scratch: &Path) {
    let cache = scratch.join(format!("cache-{label}"));
    std::fs::create_dir(&cache).unwrap();
    let sources: Vec<PathBuf> = (0..count)
        .map(|i| {
            let path = cache.join(i.to_string());
            let mut content = vec![0u8; bytes];
            content[..8.min(bytes)].copy_from_slice(&(i as u64).to_le_bytes()[..8.min(bytes)]);
            std::fs::write(&path, content).unwrap();
            path
        })
        .collect();
    let (mut links, mut copies) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        links.push(materialise(Method::HardLink, &sources, scratch));
        copies.push(materialise(Method::Copy, &sources, scratch));
    }
    let (link, copy) = (median(links), median(copies));
    let per_file = |d: Duration| d.as_secs_f64() * 1e6 / count as f64;
    println!(
        "| {label} | {count} × {bytes} B | {:.1} µs | {:.1} µs | {:.1}× |",
        per_file(link),
        per_file(copy),
        copy.as_secs_f64() / link.as_secs_f64()
    );
    std::fs::remove_dir_all(&cache).unwrap();
}

fn main() {
    let args = Args::parse();
    let scratch = tempfile::tempdir_in(&args.dir).expect("a scratch directory in --dir");
    println!("| files | count × size | hard_link per file | copy per file | copy / hard_link |");
    println!("|---|---|---|---|---|");
    measure(
        "small",
        args.small_files,
        args.small_bytes,
        args.rounds,
        scratch.path(),
    );
    measure(
        "large",
        args.large_files,
        args.large_bytes,
        args.rounds,
        scratch.path(),
    );
}
