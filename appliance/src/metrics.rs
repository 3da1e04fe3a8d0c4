//! Prometheus metrics (`serve --metrics-listen ADDR`, path `/metrics`).
//!
//! One [`Metrics`] per appliance, shared by the network front, the shards and maintenance.
//! Counters and histograms move where the work happens; what is cheaper to read than to track
//! (sessions, free space, index entries, the last backup of every source) is read when scraped.
//!
//! Labels are bounded by design: RPC method and status code, shard number, and for
//! `coffer_last_backup_timestamp_seconds` the account, host and snapshot root of each backup
//! source — never a chunk id, snapshot id or a path inside a snapshot.
//!
//! The registry is `prometheus-client`'s, which writes OpenMetrics. A scraper that asks for
//! OpenMetrics (Prometheus does) gets it as written; anything else gets the classic text format
//! 0.0.4 (what `promtool check metrics` and older scrapers read), in which a counter's `HELP`
//! and `TYPE` lines carry the `_total` suffix of its samples and there is no `# EOF`.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Content type of the OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic Prometheus text format.
pub const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";

/// An RPC by method and gRPC status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: String,
    pub code: String,
}

/// A shard.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    pub shard: String,
}

/// A backup source: account name, host and snapshot root.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub user: String,
    pub host: String,
    pub path: String,
}

/// Everything the appliance exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub rpcs: Family<RpcLabels, Counter>,
    pub rpc_seconds: Family<RpcLabels, Histogram>,
    pub rpc_received_bytes: Counter,
    pub rpc_sent_bytes: Counter,
    /// Bytes the committed snapshots cover (files' sizes): what clients backed up.
    pub logical_bytes: Counter,
    /// Plaintext bytes of the chunks uploaded (`raw_len`).
    pub chunk_raw_bytes: Counter,
    /// Bytes of the chunks uploaded as sent (compressed or sealed).
    pub chunk_received_bytes: Counter,
    /// Bytes written to packs for new chunks.
    pub chunk_stored_bytes: Counter,
    pub chunks_stored: Counter,
    pub chunks_deduplicated: Counter,
    pub find_missing_ids: Counter,
    pub find_missing_missing: Counter,
    pub snapshots_committed: Counter,
    pub logins_failed: Counter,
    pub sessions: Gauge,
    pub calls_in_flight: Gauge,
    pub upload_bytes_in_flight: Gauge,
    pub read_bytes_in_flight: Gauge,
    pub dedup_ratio: Gauge<f64, AtomicU64>,
    pub compression_ratio: Gauge<f64, AtomicU64>,
    pub pack_fsync_seconds: Histogram,
    pub packs_sealed: Counter,
    pub index_entries: Family<ShardLabels, Gauge>,
    pub disk_free_bytes: Gauge,
    pub disk_size_bytes: Gauge,
    /// With an object store: sealed packs waiting for upload, and uploaded packs kept locally.
    pub object_store_staged_packs: Gauge,
    pub object_store_staged_bytes: Gauge,
    pub object_store_cached_bytes: Gauge,
    pub maintenance_runs: Counter,
    pub maintenance_errors: Counter,
    pub maintenance_last_run_timestamp_seconds: Gauge,
    pub maintenance_last_duration_seconds: Gauge<f64, AtomicU64>,
    pub maintenance_freed_bytes: Counter,
    pub last_backup: Family<SourceLabels, Gauge>,
    /// The newest successful backup of each source (Unix seconds), the source of
    /// `last_backup`: kept beside the family so that forgotten sources can be dropped.
    sources: Mutex<HashMap<SourceLabels, i64>>,
    pub start_time_seconds: Gauge,
}

fn latency() -> Histogram {
    // 0.5 ms to about 65 s.
    Histogram::new(exponential_buckets(0.000_5, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric, all at zero.
    #[must_use]
    #[allow(clippy::too_many_lines)]
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("coffer");
        let rpcs = Family::<RpcLabels, Counter>::default();
        r.register(
            "rpcs",
            "RPCs answered, by method and gRPC status code",
            rpcs.clone(),
        );
        let rpc_seconds =
            Family::<RpcLabels, Histogram>::new_with_constructor(latency as fn() -> _);
        r.register(
            "rpc_duration_seconds",
            "Time from an RPC's request to the end of its answer, by method and status code",
            rpc_seconds.clone(),
        );
        let c = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let g = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        let gf = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::<f64, AtomicU64>::default();
            r.register(name, help, g.clone());
            g
        };
        let rpc_received_bytes = c(&mut r, "rpc_received_bytes", "Bytes of RPC request bodies");
        let rpc_sent_bytes = c(&mut r, "rpc_sent_bytes", "Bytes of RPC answer bodies");
        let logical_bytes = c(
            &mut r,
            "backup_logical_bytes",
            "Bytes the committed snapshots cover (the files' sizes)",
        );
        let chunk_raw_bytes = c(
            &mut r,
            "chunk_raw_bytes",
            "Plaintext bytes of the chunks uploaded",
        );
        let chunk_received_bytes = c(
            &mut r,
            "chunk_received_bytes",
            "Bytes of the chunks uploaded, as sent (compressed or sealed)",
        );
        let chunk_stored_bytes = c(
            &mut r,
            "chunk_stored_bytes",
            "Bytes of chunks new to the repository, as received",
        );
        let chunks_stored = c(&mut r, "chunks_stored", "Chunks new to the repository");
        let chunks_deduplicated = c(
            &mut r,
            "chunks_deduplicated",
            "Chunks uploaded that the repository already held",
        );
        let find_missing_ids = c(&mut r, "find_missing_ids", "Chunk ids asked about");
        let find_missing_missing = c(
            &mut r,
            "find_missing_missing_ids",
            "Chunk ids answered missing (to be uploaded)",
        );
        let snapshots_committed = c(&mut r, "snapshots_committed", "Snapshots committed");
        let logins_failed = c(&mut r, "logins_failed", "Logins refused");
        let sessions = g(&mut r, "sessions", "Sessions open");
        let calls_in_flight = g(&mut r, "rpcs_in_flight", "RPCs being answered");
        let upload_bytes_in_flight = g(
            &mut r,
            "upload_bytes_in_flight",
            "Bytes of uploads received and not yet durable (the shards' queues)",
        );
        let read_bytes_in_flight = g(
            &mut r,
            "read_bytes_in_flight",
            "Bytes of chunks read for restores and not yet sent",
        );
        let dedup_ratio = gf(
            &mut r,
            "dedup_ratio",
            "Bytes backed up over plaintext bytes uploaded, since the appliance started",
        );
        let compression_ratio = gf(
            &mut r,
            "compression_ratio",
            "Plaintext bytes over bytes received for the chunks uploaded, since the appliance started",
        );
        let pack_fsync_seconds = latency();
        r.register(
            "pack_fsync_duration_seconds",
            "Time of each pack group commit's write and fdatasync",
            pack_fsync_seconds.clone(),
        );
        let packs_sealed = c(&mut r, "packs_sealed", "Packs sealed (complete, read-only)");
        let index_entries = Family::<ShardLabels, Gauge>::default();
        r.register(
            "index_entries",
            "Chunks in each shard's index (RocksDB's estimate)",
            index_entries.clone(),
        );
        let disk_free_bytes = g(
            &mut r,
            "disk_free_bytes",
            "Bytes free for the repository on its file system",
        );
        let disk_size_bytes = g(
            &mut r,
            "disk_size_bytes",
            "Size of the repository's file system",
        );
        let object_store_staged_packs = g(
            &mut r,
            "object_store_staged_packs",
            "Sealed packs waiting for upload to the object store (0 without one)",
        );
        let object_store_staged_bytes = g(
            &mut r,
            "object_store_staged_bytes",
            "Bytes of sealed packs waiting for upload to the object store",
        );
        let object_store_cached_bytes = g(
            &mut r,
            "object_store_cached_bytes",
            "Bytes of uploaded packs kept on the local disk for reads",
        );
        let maintenance_runs = c(&mut r, "maintenance_runs", "Maintenance runs finished");
        let maintenance_errors = c(&mut r, "maintenance_errors", "Maintenance runs that failed");
        let maintenance_last_run_timestamp_seconds = g(
            &mut r,
            "maintenance_last_run_timestamp_seconds",
            "When the last maintenance run finished (Unix time)",
        );
        let maintenance_last_duration_seconds = gf(
            &mut r,
            "maintenance_last_duration_seconds",
            "How long the last maintenance run took",
        );
        let maintenance_freed_bytes = c(
            &mut r,
            "maintenance_freed_bytes",
            "Pack bytes deleted by garbage collection",
        );
        let last_backup = Family::<SourceLabels, Gauge>::default();
        r.register(
            "last_backup_timestamp_seconds",
            "The newest complete snapshot of each backup source (Unix time)",
            last_backup.clone(),
        );
        let start_time_seconds = g(
            &mut r,
            "start_time_seconds",
            "When the appliance started (Unix time)",
        );
        start_time_seconds.set(crate::clock::now_us() / 1_000_000);
        Self {
            registry: r,
            rpcs,
            rpc_seconds,
            rpc_received_bytes,
            rpc_sent_bytes,
            logical_bytes,
            chunk_raw_bytes,
            chunk_received_bytes,
            chunk_stored_bytes,
            chunks_stored,
            chunks_deduplicated,
            find_missing_ids,
            find_missing_missing,
            snapshots_committed,
            logins_failed,
            sessions,
            calls_in_flight,
            upload_bytes_in_flight,
            read_bytes_in_flight,
            dedup_ratio,
            compression_ratio,
            pack_fsync_seconds,
            packs_sealed,
            index_entries,
            disk_free_bytes,
            disk_size_bytes,
            object_store_staged_packs,
            object_store_staged_bytes,
            object_store_cached_bytes,
            maintenance_runs,
            maintenance_errors,
            maintenance_last_run_timestamp_seconds,
            maintenance_last_duration_seconds,
            maintenance_freed_bytes,
            last_backup,
            sources: Mutex::new(HashMap::new()),
            start_time_seconds,
        }
    }

    /// Records a complete snapshot of `identity` (`user@host`) for `path` taken at `time_us`.
    pub fn backed_up(&self, identity: &str, path: &str, time_us: i64) {
        let (user, host) = identity.split_once('@').unwrap_or((identity, ""));
        let key = SourceLabels {
            user: user.to_owned(),
            host: host.to_owned(),
            path: path.to_owned(),
        };
        let secs = time_us.div_euclid(1_000_000);
        let mut sources = crate::net::limits::lock(&self.sources);
        let newest = sources.entry(key.clone()).or_insert(secs);
        *newest = (*newest).max(secs);
        self.last_backup.get_or_create(&key).set(*newest);
    }

    /// Replaces every source's last backup with what `snapshots` show (at startup and after
    /// maintenance forgot snapshots): a source with no complete snapshot left disappears.
    pub fn reset_backups(&self, snapshots: &[coffer_proto::v1::Snapshot]) {
        {
            let mut sources = crate::net::limits::lock(&self.sources);
            sources.clear();
            self.last_backup.clear();
        }
        for s in snapshots.iter().filter(|s| !s.partial) {
            self.backed_up(&s.identity, &s.path, s.time_us);
        }
    }

    /// The ratios, from the counters.
    fn update_ratios(&self) {
        let raw = self.chunk_raw_bytes.get();
        let received = self.chunk_received_bytes.get();
        let logical = self.logical_bytes.get();
        if raw > 0 {
            self.dedup_ratio.set(logical as f64 / raw as f64);
        }
        if received > 0 {
            self.compression_ratio.set(raw as f64 / received as f64);
        }
    }

    /// The exposition for a scraper that sent `accept`: OpenMetrics when asked for, the classic
    /// text format otherwise. Returns the content type and the body.
    #[must_use]
    pub fn render(&self, accept: Option<&str>) -> (&'static str, String) {
        self.update_ratios();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            (OPENMETRICS, out)
        } else {
            (TEXT_004, to_text_004(&out))
        }
    }
}

/// OpenMetrics text as written by `prometheus-client` → the classic text format: a counter
/// family's `HELP`/`TYPE` lines take its samples' `_total` name, `# UNIT` and `# EOF` go.
#[must_use]
pub fn to_text_004(open: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for l in open.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.insert(name.to_owned());
            }
        }
    }
    let mut out = String::with_capacity(open.len());
    for l in open.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = l.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(l));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_read_as_classic_text_unless_openmetrics_is_asked_for() {
        let m = Metrics::new();
        m.rpcs
            .get_or_create(&RpcLabels {
                method: "Hello".into(),
                code: "OK".into(),
            })
            .inc();
        m.backed_up("alice@laptop", "/home/alice", 1_700_000_000_500_000);
        m.backed_up("alice@laptop", "/home/alice", 1_600_000_000_000_000);
        let (ct, open) = m.render(Some("application/openmetrics-text; version=1.0.0"));
        assert_eq!(ct, OPENMETRICS);
        assert!(open.contains("# TYPE coffer_rpcs counter\n"), "{open}");
        assert!(open.ends_with("# EOF\n"));
        let (ct, text) = m.render(Some("text/plain"));
        assert_eq!(ct, TEXT_004);
        assert!(
            text.contains("# TYPE coffer_rpcs_total counter\n"),
            "{text}"
        );
        assert!(text.contains("coffer_rpcs_total{method=\"Hello\",code=\"OK\"} 1\n"));
        assert!(!text.contains("# EOF"));
        // The newest backup wins; a reset from the catalog drops forgotten sources.
        assert!(text.contains(
            "coffer_last_backup_timestamp_seconds{user=\"alice\",host=\"laptop\",path=\"/home/alice\"} 1700000000\n"
        ), "{text}");
        m.reset_backups(&[]);
        assert!(!m.render(None).1.contains("alice"));
    }
}
