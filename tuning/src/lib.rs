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
    /// Feature flags relevant to the hot path.
    pub features: CpuFeatures,
    /// `RLIMIT_MEMLOCK` soft limit in bytes (`u64::MAX` for unlimited).
    pub memlock_bytes: u64,
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
        Self {
            cpus: allowed_cpus(),
            features: CpuFeatures::detect(),
            memlock_bytes: memlock_limit(),
        }
    }
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
    affinity::memlock()
}

// The one module of the workspace allowed to use `unsafe`: two read-only libc queries.
#[allow(unsafe_code)]
mod affinity {
    //! The only unsafe code of this crate: two read-only libc queries.

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

    pub(super) fn memlock() -> u64 {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut lim) };
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
    /// Advice for the operator, one line each, with its reason.
    pub advice: Vec<String>,
}

/// Why no plan could be made.
#[derive(Debug, PartialEq, Eq)]
pub enum PlanError {
    /// More shards than CPUs were asked for.
    TooManyShards { shards: usize, cpus: usize },
    /// Zero shards.
    NoShards,
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
        let placements = hw
            .cpus
            .iter()
            .take(shards)
            .enumerate()
            .map(|(i, &cpu)| ShardPlacement {
                shard: u16::try_from(i).unwrap_or(u16::MAX),
                cpu,
            })
            .collect();
        let mut advice = Vec::new();
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
        Ok(Self {
            shards: placements,
            network_threads: hw.cpus.len().clamp(1, 8),
            io_memory_per_shard: 4 << 20,
            ring_depth: 128,
            pack_target_bytes: 128 << 20,
            index_cache_bytes: 128 << 20,
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
            features: CpuFeatures {
                aes_ni: true,
                ..CpuFeatures::default()
            },
            memlock_bytes: u64::MAX,
        }
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
        let hw = Hardware::detect();
        assert!(!hw.cpus.is_empty());
        assert!(hw.memlock_bytes > 0);
    }
}
