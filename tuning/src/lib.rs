//! `coffer-tuning`: describes the hardware and plans where the appliance runs what.
//!
//! It detects cores, CPU features and the locked-memory limit, and turns them into a
//! [`Plan`]: one pinned glommio executor per shard plus the network threads. It imports nothing
//! of the project; others apply the plan.

use serde::Serialize;

/// What this machine offers.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Hardware {
    /// CPUs this process may run on (its affinity mask), in ascending order.
    pub cpus: Vec<usize>,
    /// Hyperthread siblings: groups of allowed CPUs that share one physical core.
    pub cores: Vec<Vec<usize>>,
    /// Feature flags relevant to the hot path.
    pub features: CpuFeatures,
    /// `RLIMIT_MEMLOCK` soft limit in bytes (`u64::MAX` for unlimited).
    pub memlock_bytes: u64,
    /// Physical memory in bytes (0 when unknown).
    pub memory_bytes: u64,
    /// `RLIMIT_NOFILE` soft limit (open files and sockets; `u64::MAX` for unlimited).
    pub nofile: u64,
    pub io_uring: IoUring,
    /// Block devices under the repository (when one was given).
    pub disks: Vec<Disk>,
}

/// io_uring availability.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct IoUring {
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// `kernel.io_uring_disabled`: 0 enabled, 1 restricted to a group, 2 disabled (absent: 0).
    pub disabled: u8,
}

/// A block device holding the repository.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Disk {
    pub name: String,
    pub rotational: bool,
}

/// CPU features the hot path uses.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Default)]
#[allow(clippy::struct_excessive_bools)]
pub struct CpuFeatures {
    pub aes_ni: bool,
    pub vaes: bool,
    pub pclmulqdq: bool,
    pub avx2: bool,
    pub avx512f: bool,
    pub sha_ni: bool,
}

impl Hardware {
    /// Reads the machine this process runs on.
    #[must_use]
    pub fn detect() -> Self {
        let cpus = allowed_cpus();
        Self {
            cores: cores(&cpus),
            cpus,
            features: CpuFeatures::detect(),
            memlock_bytes: memlock_limit(),
            memory_bytes: memory(),
            nofile: affinity::rlimit(libc::RLIMIT_NOFILE),
            io_uring: IoUring {
                kernel: read_trim("/proc/sys/kernel/osrelease"),
                disabled: read_trim("/proc/sys/kernel/io_uring_disabled")
                    .parse()
                    .unwrap_or(0),
            },
            disks: Vec::new(),
        }
    }

    /// [`Hardware::detect`] plus the disks under `repo`.
    #[must_use]
    pub fn detect_for(repo: &std::path::Path) -> Self {
        let mut hw = Self::detect();
        hw.disks = disks_under(repo);
        hw
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Parses a kernel CPU list such as `0-3,8,10-11`.
fn cpu_list(s: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    out.extend(a..=b);
                }
            }
            None => out.extend(part.parse::<usize>()),
        }
    }
    out
}

/// Groups allowed CPUs by physical core (sysfs `thread_siblings_list`).
fn cores(cpus: &[usize]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for &c in cpus {
        if groups.iter().any(|g| g.contains(&c)) {
            continue;
        }
        let path = format!("/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list");
        let mut g: Vec<usize> = cpu_list(&read_trim(&path))
            .into_iter()
            .filter(|x| cpus.contains(x))
            .collect();
        if !g.contains(&c) {
            g = vec![c];
        }
        groups.push(g);
    }
    groups
}

fn memory() -> u64 {
    read_trim("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The block device of the file system holding `path` (and its parent disk for a partition).
fn disks_under(path: &std::path::Path) -> Vec<Disk> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let dev = meta.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let sys = std::path::PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let Ok(real) = std::fs::canonicalize(&sys) else {
        return Vec::new();
    };
    // A partition's queue/ lives in its parent device.
    let disk = if real.join("partition").exists() {
        real.parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or(real)
    } else {
        real
    };
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let rotational = read_trim(&format!("{}/queue/rotational", disk.display())) == "1";
    vec![Disk { name, rotational }]
}

impl CpuFeatures {
    /// Runtime feature detection.
    #[must_use]
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            Self {
                aes_ni: std::arch::is_x86_feature_detected!("aes"),
                vaes: std::arch::is_x86_feature_detected!("vaes"),
                pclmulqdq: std::arch::is_x86_feature_detected!("pclmulqdq"),
                avx2: std::arch::is_x86_feature_detected!("avx2"),
                avx512f: std::arch::is_x86_feature_detected!("avx512f"),
                sha_ni: std::arch::is_x86_feature_detected!("sha"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Self::default()
        }
    }
}

fn allowed_cpus() -> Vec<usize> {
    let n = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let cpus = affinity::cpus();
    if cpus.is_empty() {
        (0..n).collect()
    } else {
        cpus
    }
}

fn memlock_limit() -> u64 {
    affinity::rlimit(libc::RLIMIT_MEMLOCK)
}

// The one module of the workspace allowed to use `unsafe`: two read-only libc queries.
#[allow(unsafe_code)]
mod affinity {
    //! The only unsafe code of this crate: read-only libc queries.

    pub(super) fn cpus() -> Vec<usize> {
        // SAFETY: `set` is a plain bit array that sched_getaffinity fills; we pass its size.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw mut set) != 0
            {
                return Vec::new();
            }
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect()
        }
    }

    pub(super) fn rlimit(which: libc::__rlimit_resource_t) -> u64 {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own.
        let rc = unsafe { libc::getrlimit(which, &raw mut lim) };
        if rc != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
            u64::MAX
        } else {
            lim.rlim_cur
        }
    }
}

/// Where one shard runs.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct ShardPlacement {
    pub shard: u16,
    pub cpu: usize,
}

/// The placement plan `serve` applies.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Plan {
    pub shards: Vec<ShardPlacement>,
    /// Worker threads of the network runtime (tokio); they float over all allowed CPUs.
    pub network_threads: usize,
    /// Bytes of registered io_uring memory per shard.
    pub io_memory_per_shard: usize,
    /// io_uring submission queue depth per shard.
    pub ring_depth: usize,
    /// Target size of a pack before it is sealed.
    pub pack_target_bytes: u64,
    /// RocksDB block cache per shard.
    pub index_cache_bytes: usize,
    /// What one peer, one account and everyone together may hold (`serve` flags override).
    pub limits: Limits,
    /// Advice for the operator, one line each, with its reason.
    pub advice: Vec<String>,
}

/// Resource limits of the network front, derived from memory and the open-files limit. Each is
/// a `serve` flag; `tune` prints them. What a limit bounds is said where it is enforced.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; a new one past it closes the longest-idle connection, or is
    /// refused when every one is busy.
    pub connections: usize,
    /// HTTP/2 streams (calls) open at once on one connection.
    pub streams_per_connection: u32,
    /// Streaming calls one account has open at once, over all its connections and sessions.
    pub streams_per_account: usize,
    /// Messages one request stream may carry.
    pub messages_per_stream: u64,
    /// A connection with no call in progress for this long is closed (seconds).
    pub idle_secs: u64,
    /// A request stream that sends no message for this long is ended (seconds).
    pub stream_idle_secs: u64,
    /// Chunk bytes read from packs and not yet sent, appliance-wide.
    pub read_budget_bytes: u64,
    /// Upload bytes received and not yet stored, per account.
    pub upload_bytes_per_account: u64,
    /// Upload bytes queued at one shard.
    pub shard_queue_bytes: u64,
    /// Chunk ids one session may hold (uploaded, proved, or answered present).
    pub session_chunks: u64,
    /// Chunk ids all sessions together may hold.
    pub all_session_chunks: u64,
    /// How long a request waits for a budget that makes no progress before it is refused
    /// (seconds).
    pub admission_wait_secs: u64,
}

/// Memory one chunk id held by a session costs, with the hash set's overhead at its worst.
pub const SESSION_CHUNK_BYTES: u64 = 80;

impl Limits {
    /// Limits for a machine with `memory` bytes (0: unknown) and `nofile` open files.
    #[must_use]
    pub fn new(memory: u64, nofile: u64, shards: usize) -> Self {
        let memory = if memory == 0 { 4 << 30 } else { memory };
        // Half the descriptors for connections, the rest for packs, RocksDB and the listener.
        let connections =
            usize::try_from((nofile / 2).saturating_sub(64).clamp(64, 16_384)).unwrap_or(16_384);
        // Session state: a quarter of memory over all sessions; one session at most 16 M ids.
        let all_session_chunks = (memory / 4 / SESSION_CHUNK_BYTES).max(1 << 20);
        let shard_queue_bytes = (memory / 16 / shards.max(1) as u64).clamp(64 << 20, 256 << 20);
        Self {
            connections,
            streams_per_connection: 32,
            streams_per_account: 64,
            messages_per_stream: 1 << 20,
            idle_secs: 300,
            stream_idle_secs: 120,
            read_budget_bytes: (memory / 8).clamp(256 << 20, 4 << 30),
            upload_bytes_per_account: 256 << 20,
            shard_queue_bytes,
            session_chunks: all_session_chunks.min(16 << 20),
            all_session_chunks,
            admission_wait_secs: 30,
        }
    }
}

/// Why no plan could be made.
#[derive(Debug, PartialEq, Eq)]
pub enum PlanError {
    /// More shards than CPUs were asked for.
    TooManyShards { shards: usize, cpus: usize },
    /// Zero shards.
    NoShards,
    /// `kernel.io_uring_disabled=2`.
    IoUringDisabled,
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooManyShards { shards, cpus } => write!(
                f,
                "the repository has {shards} shards but only {cpus} CPUs are available to this \
                 process; run on a machine with at least {shards} CPUs (each shard is pinned to \
                 its own core)"
            ),
            Self::NoShards => f.write_str("a repository needs at least one shard"),
            Self::IoUringDisabled => f.write_str(
                "io_uring is disabled on this kernel (sysctl kernel.io_uring_disabled=2); the \
                 appliance needs it: set `sysctl kernel.io_uring_disabled=0`",
            ),
        }
    }
}

impl std::error::Error for PlanError {}

/// Minimum `RLIMIT_MEMLOCK` glommio needs to set up io_uring.
pub const MIN_MEMLOCK_BYTES: u64 = 512 * 1024;

impl Plan {
    /// Places `shards` shards on distinct CPUs of `hw`.
    ///
    /// # Errors
    /// [`PlanError`] when there are more shards than CPUs, or none.
    pub fn new(hw: &Hardware, shards: usize) -> Result<Self, PlanError> {
        if shards == 0 {
            return Err(PlanError::NoShards);
        }
        if shards > hw.cpus.len() {
            return Err(PlanError::TooManyShards {
                shards,
                cpus: hw.cpus.len(),
            });
        }
        if hw.io_uring.disabled >= 2 {
            return Err(PlanError::IoUringDisabled);
        }
        // One shard per physical core first; hyperthread siblings only when cores run out.
        let mut order: Vec<usize> = hw.cores.iter().filter_map(|g| g.first().copied()).collect();
        for g in &hw.cores {
            order.extend(g.iter().skip(1));
        }
        order.extend(
            hw.cpus
                .iter()
                .filter(|c| !hw.cores.iter().flatten().any(|x| x == *c)),
        );
        let placements: Vec<ShardPlacement> = order
            .iter()
            .take(shards)
            .enumerate()
            .map(|(i, &cpu)| ShardPlacement {
                shard: u16::try_from(i).unwrap_or(u16::MAX),
                cpu,
            })
            .collect();
        let mut advice = Vec::new();
        if shards > hw.cores.len() && !hw.cores.is_empty() {
            advice.push(format!(
                "{shards} shards on {} physical cores: some shards share a core with a \
                 hyperthread sibling (each is slower than on a core of its own)",
                hw.cores.len()
            ));
        }
        if hw.io_uring.disabled == 1 {
            advice.push(
                "kernel.io_uring_disabled=1: only members of kernel.io_uring_group may use \
                 io_uring; run the appliance in that group or set the sysctl to 0"
                    .to_string(),
            );
        }
        if hw.disks.iter().any(|d| d.rotational) {
            advice.push(
                "the repository is on a rotational disk: packs are written sequentially, but \
                 restores read randomly; prefer SSD for the index (index/ may be a symlink)"
                    .to_string(),
            );
        }
        if !hw.features.aes_ni {
            advice.push(
                "no AES-NI: AES-256-GCM runs in software and will be the slowest stage".to_string(),
            );
        }
        if hw.memlock_bytes < 64 * 1024 * 1024 {
            advice.push(format!(
                "LimitMEMLOCK={} is low: raise it to 64M or more (LimitMEMLOCK=infinity in the \
                 systemd unit) so io_uring buffers can be registered",
                hw.memlock_bytes
            ));
        }
        // RocksDB block cache: 128 MiB per shard, at most 1/16 of memory over all shards.
        let cache_cap = usize::try_from(hw.memory_bytes / 16 / shards as u64).unwrap_or(usize::MAX);
        let index_cache_bytes = if hw.memory_bytes == 0 {
            128 << 20
        } else {
            (128usize << 20).min(cache_cap).max(8 << 20)
        };
        Ok(Self {
            limits: Limits::new(hw.memory_bytes, hw.nofile, shards),
            shards: placements,
            network_threads: hw.cpus.len().clamp(1, 8),
            io_memory_per_shard: 4 << 20,
            ring_depth: 128,
            pack_target_bytes: 128 << 20,
            index_cache_bytes,
            advice,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hw(n: usize) -> Hardware {
        Hardware {
            cpus: (0..n).collect(),
            cores: (0..n).map(|c| vec![c]).collect(),
            features: CpuFeatures {
                aes_ni: true,
                ..CpuFeatures::default()
            },
            memlock_bytes: u64::MAX,
            memory_bytes: 64 << 30,
            nofile: 1 << 20,
            io_uring: IoUring::default(),
            disks: Vec::new(),
        }
    }

    #[test]
    fn physical_cores_before_siblings() {
        let mut h = hw(4);
        h.cores = vec![vec![0, 2], vec![1, 3]];
        let plan = Plan::new(&h, 3).unwrap();
        let cpus: Vec<usize> = plan.shards.iter().map(|p| p.cpu).collect();
        assert_eq!(cpus, vec![0, 1, 2]);
        assert!(plan.advice.iter().any(|a| a.contains("hyperthread")));
        assert_eq!(cpu_list("0-2,5,7-8"), vec![0, 1, 2, 5, 7, 8]);
    }

    #[test]
    fn refuses_disabled_io_uring_and_sizes_caches_by_memory() {
        let mut h = hw(2);
        h.io_uring.disabled = 2;
        assert_eq!(Plan::new(&h, 1), Err(PlanError::IoUringDisabled));
        let mut small = hw(2);
        small.memory_bytes = 1 << 30;
        assert_eq!(Plan::new(&small, 2).unwrap().index_cache_bytes, 32 << 20);
        assert_eq!(Plan::new(&hw(2), 2).unwrap().index_cache_bytes, 128 << 20);
    }

    #[test]
    fn one_shard_per_cpu() {
        let plan = Plan::new(&hw(4), 3).unwrap();
        let cpus: Vec<usize> = plan.shards.iter().map(|p| p.cpu).collect();
        assert_eq!(cpus, vec![0, 1, 2]);
        assert!(plan.advice.is_empty());
    }

    #[test]
    fn refuses_more_shards_than_cpus() {
        assert_eq!(
            Plan::new(&hw(2), 3),
            Err(PlanError::TooManyShards { shards: 3, cpus: 2 })
        );
        assert_eq!(Plan::new(&hw(2), 0), Err(PlanError::NoShards));
    }

    #[test]
    fn detects_this_machine() {
        let hw = Hardware::detect_for(std::path::Path::new("/"));
        assert!(!hw.cpus.is_empty());
        assert!(hw.memlock_bytes > 0);
        assert!(hw.memory_bytes > 0);
        assert_eq!(hw.cores.iter().flatten().count(), hw.cpus.len());
        assert!(!hw.io_uring.kernel.is_empty());
    }
}
