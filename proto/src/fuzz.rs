//! A small mutation fuzzer for the decoders (F1, F2), run as ordinary tests in every crate that
//! decodes untrusted bytes: packs, index entries, trees, catalog records, requests as the
//! appliance parses them, answers as the client parses them.
//!
//! Each target starts from its committed corpus (`tests/fuzz/corpus/<target>/`) plus the valid
//! encodings its test builds, replays every earlier finding (`tests/fuzz/findings/<target>/`),
//! then mutates for `COFFER_FUZZ_SECS` seconds (5 when unset; the README's test command sets 60)
//! with a PRNG seeded from `COFFER_FUZZ_SEED` or the clock, printed. A panic, or an input that
//! takes longer than [`SLOW`], fails the test after writing the input under `findings/`: it is
//! replayed by every later run (a regression test), and the fix makes it pass.
//!
//! No coverage guidance (that needs a nightly toolchain, which CI here cannot install); the
//! mutations know the formats' shapes instead: length and offset fields set to edges, ranges
//! cut, repeated and spliced between seeds.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One input taking longer than this is a finding (bounded time per input).
pub const SLOW: Duration = Duration::from_secs(1);
/// Inputs grow to at most this many bytes.
const MAX_INPUT: usize = 1 << 20;

/// xorshift64*: deterministic for a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            usize::try_from(self.next() % n as u64).unwrap_or(0)
        }
    }
}

const EDGES: [u64; 10] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    u64::MAX,
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    for _ in 0..=rng.below(4) {
        let len = input.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = u8::try_from(rng.next() & 0xff).unwrap_or(0);
            }
            2 => {
                let i = rng.below(len + 1);
                let n = rng.below(16) + 1;
                let bytes: Vec<u8> = (0..n).map(|_| (rng.next() & 0xff) as u8).collect();
                input.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below(len - i) + 1;
                input.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below((len - i).min(64)) + 1;
                let copy = input[i..i + n].to_vec();
                let at = rng.below(len + 1);
                input.splice(at..at, copy);
            }
            5 => input.truncate(rng.below(len + 1)),
            6 if len >= 4 => {
                // A length or offset field set to an edge value (u32 or u64, little-endian).
                let edge = EDGES[rng.below(EDGES.len())];
                let w = if len >= 8 && rng.below(2) == 0 { 8 } else { 4 };
                let i = rng.below(len - w + 1);
                input[i..i + w].copy_from_slice(&edge.to_le_bytes()[..w]);
            }
            7 if !seeds.is_empty() => {
                let other = &seeds[rng.below(seeds.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            _ => {
                // A varint-shaped byte run (protobuf lengths).
                let i = rng.below(len + 1);
                input.splice(i..i, [0xff, 0xff, 0xff, 0xff, 0x0f]);
            }
        }
    }
    input.truncate(MAX_INPUT);
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fuzz")
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read(e.path()).ok().map(|b| (e.path(), b)))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Seconds of mutation per target.
fn budget() -> Duration {
    let secs = std::env::var("COFFER_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    Duration::from_secs(secs)
}

/// Runs `target` over the corpus, earlier findings, `seeds` and mutations of them. Returns how
/// many inputs ran.
///
/// With `COFFER_FUZZ_WRITE_CORPUS=1`, writes `seeds` into the corpus directory first (how the
/// committed corpus was made).
///
/// # Panics
/// On a finding: an input that panicked or took longer than [`SLOW`], written under
/// `tests/fuzz/findings/<name>/`.
pub fn run(name: &str, seeds: &[Vec<u8>], target: impl Fn(&[u8])) -> u64 {
    let corpus_dir = root().join("corpus").join(name);
    let findings_dir = root().join("findings").join(name);
    if std::env::var_os("COFFER_FUZZ_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(&corpus_dir).expect("corpus directory");
        for s in seeds {
            let h = blake3::hash(s).to_hex();
            std::fs::write(corpus_dir.join(&h.as_str()[..16]), s).expect("writing the corpus");
        }
    }
    let mut pool: Vec<Vec<u8>> = seeds.to_vec();
    pool.extend(files(&corpus_dir).into_iter().map(|(_, b)| b));
    let seed = std::env::var("COFFER_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            u64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos()
                    & u128::from(u64::MAX),
            )
            .unwrap_or(1)
        })
        | 1;
    let once = |input: &[u8]| -> Result<(), String> {
        let t = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| target(input)));
        match r {
            Err(p) => Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "panic".into())),
            Ok(()) if t.elapsed() > SLOW => Err(format!("took {:?}", t.elapsed())),
            Ok(()) => Ok(()),
        }
    };
    let finding = |input: &[u8], why: String| -> ! {
        std::fs::create_dir_all(&findings_dir).expect("findings directory");
        let h = blake3::hash(input).to_hex();
        let path = findings_dir.join(&h.as_str()[..16]);
        std::fs::write(&path, input).expect("writing a finding");
        panic!(
            "fuzz target {name} (seed {seed}): {why}; input written to {} ({} bytes)",
            path.display(),
            input.len()
        );
    };
    // Earlier findings and the corpus first: regressions fail at once.
    let mut runs = 0u64;
    for (_, b) in files(&findings_dir) {
        if let Err(why) = once(&b) {
            finding(&b, why);
        }
        runs += 1;
    }
    for b in &pool {
        if let Err(why) = once(b) {
            finding(b, why);
        }
        runs += 1;
    }
    let mut rng = Rng(seed);
    let end = Instant::now() + budget();
    let mut input = Vec::new();
    while Instant::now() < end {
        for _ in 0..64 {
            if pool.is_empty() || rng.below(16) == 0 {
                input.clear();
                let n = rng.below(256);
                input.extend((0..n).map(|_| (rng.next() & 0xff) as u8));
            } else {
                input.clone_from(&pool[rng.below(pool.len())]);
            }
            mutate(&mut rng, &mut input, &pool);
            if let Err(why) = once(&input) {
                finding(&input, why);
            }
            runs += 1;
        }
    }
    eprintln!("fuzz {name}: {runs} inputs (seed {seed})");
    runs
}
