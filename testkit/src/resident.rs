//! Resident-memory checks for tests that stream large blobs: content of any size made a
//! MiB at a time (so the test itself never holds it whole), and a sampler of the
//! process's resident set while a transfer runs. The servers run in the test's process,
//! so a server that buffered a whole blob would show up in the peak.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kiln_store::{Digest, DigestFunction};

/// This process's resident set (VmRSS), from /proc.
pub fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// Pseudo-random content of `pieces` MiB: one random MiB repeated, each repetition's first
/// 8 bytes overwritten with its index, so that no two pieces are alike (the content is not
/// trivially periodic) while making a piece costs only a copy.
pub struct LargeContent {
    block: Vec<u8>,
    pieces: u64,
}

impl LargeContent {
    /// The size of each piece.
    pub const PIECE: usize = 1 << 20;

    pub fn new(pieces: u64, seed: u64) -> Self {
        // SplitMix64: deterministic, and no dependency for a MiB of noise.
        let mut state = seed;
        let mut block = Vec::with_capacity(Self::PIECE);
        while block.len() < Self::PIECE {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            block.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        LargeContent { block, pieces }
    }

    pub fn pieces(&self) -> u64 {
        self.pieces
    }

    /// The total size in bytes.
    pub fn len(&self) -> u64 {
        self.pieces * Self::PIECE as u64
    }

    pub fn is_empty(&self) -> bool {
        self.pieces == 0
    }

    /// Piece `index` (0-based), a fresh MiB.
    pub fn piece(&self, index: u64) -> Vec<u8> {
        assert!(index < self.pieces, "piece {index} of {}", self.pieces);
        let mut piece = self.block.clone();
        piece[..8].copy_from_slice(&index.to_le_bytes());
        piece
    }

    /// The content's digest, hashing one piece at a time.
    pub fn digest(&self, function: DigestFunction) -> Digest {
        let mut hasher = function.hasher();
        for index in 0..self.pieces {
            hasher.update(&self.piece(index));
        }
        Digest::new(function, hasher.finalize(), self.len())
    }
}

/// Samples the resident set on a thread of its own every `interval` until stopped, and
/// keeps the peak: a transfer's high-water mark, which one reading after it would miss.
pub struct PeakSampler {
    baseline: u64,
    peak: Arc<AtomicU64>,
    samples: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What a [`PeakSampler`] saw.
#[derive(Debug, Clone, Copy)]
pub struct ResidentPeak {
    /// The resident set when sampling started.
    pub baseline: u64,
    /// The highest resident set sampled (at least the baseline).
    pub peak: u64,
    pub samples: u64,
}

impl ResidentPeak {
    /// How far the resident set rose above the baseline.
    pub fn growth(&self) -> u64 {
        self.peak.saturating_sub(self.baseline)
    }
}

impl std::fmt::Display for ResidentPeak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "peak growth {:.1} MiB (baseline {:.1} MiB, peak {:.1} MiB, {} samples)",
            self.growth() as f64 / (1 << 20) as f64,
            self.baseline as f64 / (1 << 20) as f64,
            self.peak as f64 / (1 << 20) as f64,
            self.samples
        )
    }
}

impl PeakSampler {
    /// Takes the baseline now and starts sampling every `interval`.
    pub fn start(interval: Duration) -> Self {
        let baseline = resident_bytes();
        let peak = Arc::new(AtomicU64::new(baseline));
        let samples = Arc::new(AtomicU64::new(1));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("rss-sampler".into())
            .spawn({
                let (peak, samples, stop) = (peak.clone(), samples.clone(), stop.clone());
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        peak.fetch_max(resident_bytes(), Ordering::Relaxed);
                        samples.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(interval);
                    }
                }
            })
            .expect("spawning the sampler thread");
        PeakSampler {
            baseline,
            peak,
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling (after one last sample) and returns the peak.
    pub fn finish(mut self) -> ResidentPeak {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the sampler thread does not panic");
        }
        self.peak.fetch_max(resident_bytes(), Ordering::Relaxed);
        ResidentPeak {
            baseline: self.baseline,
            peak: self.peak.load(Ordering::Relaxed),
            samples: self.samples.load(Ordering::Relaxed) + 1,
        }
    }
}

impl Drop for PeakSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
