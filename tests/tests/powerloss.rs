//! Power loss and I/O faults (RELIABILITY C2, C3, C4) with the real appliance on a fault-injecting
//! file system (`coffer_tests::faultfs`): unsynced data is dropped — wholly, partly or torn — at
//! randomised crash points, and `fsync`, `write` and space fail on demand.
//!
//! The oracle is kept outside the appliance (RocksDB's crash-test style): which snapshots the
//! client saw acknowledged, which backups it attempted (by source path), which deletions were
//! acknowledged. After every power cycle the appliance must start without any repair mode and:
//! every acknowledged snapshot is listed and restores bit-exact; every listed snapshot was
//! attempted and restores bit-exact (I4: nothing half-committed is presented); `verify` finds
//! nothing wrong (I1–I3); at the end an index rebuilt from the pack footers equals the live one
//! (I5).
//!
//! `COFFER_CRASH_POINTS` (default 200) sets the number of power cuts, `COFFER_CRASH_SEED` the
//! seed (printed; every failure message names it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use coffer_tests::faultfs::model::CrashReport;
use coffer_tests::faultfs::{Fault, FaultFs, Op};
use coffer_tests::{admin, coffer, connect_client, describe, Appliance};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ALICE: &str = "alice@laptop";
const BOB: &str = "bob@desktop";
const MIB: u64 = 1 << 20;

/// The classes of operation every run must have cut the power in at least once (C3). The
/// write path: pack create → append → fsync → its directory → index (RocksDB WAL) → ack;
/// commit (catalog); maintenance (pack deletion); and the start after a crash.
const MUST_CRASH_IN: &[&str] = &[
    "mkdir repo/packs/<xx>",
    "fsyncdir repo/packs",
    "create repo/packs/<xx>/<id>",
    "fsyncdir repo/packs/<xx>",
    "write repo/packs/<xx>/<id>",
    "fsync repo/packs/<xx>/<id>",
    "truncate repo/packs/<xx>/<id>",
    "write repo/index/<shard>/<wal>",
    "fsync repo/index/<shard>/<wal>",
    "write repo/catalog/<wal>",
    "fsync repo/catalog/<wal>",
    "write repo/packs/catalog/<journal>",
    "fsync repo/packs/catalog/<journal>",
    "unlink repo/packs/<xx>/<id>",
    "(after the workload)",
];

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The repository on its fault-injecting file system, the appliance and a client. Fields drop in
/// order: the appliance is killed before the file system is unmounted, before the directory goes.
struct Rig {
    app: Appliance,
    fs: FaultFs,
    cfg: PathBuf,
    /// A second user, backing up at the same time as the first (other shards' group commits,
    /// other sessions' commits in flight at the cut).
    cfg_b: PathBuf,
    seed: u64,
    /// What the last power cut hit and what survived (for failure messages).
    last_cut: String,
    dir: tempfile::TempDir,
}

impl Rig {
    fn new(seed: u64, capacity: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let fs = FaultFs::mount(&mnt, capacity).expect(
            "mounting the fault-injecting FUSE file system (needs /dev/fuse and root or \
             fusermount3)",
        );
        let mut app = Appliance::init_in(
            dir.path(),
            &mnt.join("repo"),
            2,
            16 << 10,
            &[ALICE, BOB],
            &["--default-access", "full"],
        )
        .unwrap();
        app.pack_target = Some(256 << 10);
        app.serve_args = vec!["--gc-grace".into(), "0".into()];
        let cfg = dir.path().join("alice.toml");
        let cfg_b = dir.path().join("bob.toml");
        Self {
            app,
            fs,
            cfg,
            cfg_b,
            seed,
            last_cut: String::new(),
            dir,
        }
    }

    /// The seed and the last cut, for failure messages.
    fn ctx(&self) -> String {
        format!("seed {} (last cut: {})", self.seed, self.last_cut)
    }

    fn base(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the appliance and connects the client; `Err` when the power went out meanwhile.
    fn start(&mut self) -> Result<(), String> {
        let ctl = self.fs.control();
        match self.app.start() {
            Ok(()) if !ctl.crashed() => {
                connect_client(&self.app, &self.cfg, "alice", "laptop");
                connect_client(&self.app, &self.cfg_b, "bob", "desktop");
                Ok(())
            }
            Ok(()) => Err("the power went out just after the start".into()),
            Err(e) if ctl.crashed() => Err(format!("the power went out during the start: {e}")),
            Err(e) => panic!(
                "seed {}: the appliance did not start after a power cut (no repair mode may be \
                 needed): {e}\n{}",
                self.seed,
                self.app.log_tail()
            ),
        }
    }

    /// Power off (killing what still runs), then on with what survived.
    fn power_cycle(&mut self, seed: u64) -> CrashReport {
        self.fs.control().crash_now();
        self.app.kill();
        self.fs.power_cycle(seed).expect("remount")
    }
}

/// Source trees: `shared` is the same in every round (deduplicated), `grow` grows a little each
/// round (mostly deduplicated), `new-K` is new.
fn source(base: &Path, round: u64, rng: &mut StdRng) -> PathBuf {
    let src = base.join(format!("src-{round}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("shared"), coffer_tests::data(1, 300 << 10, false)).unwrap();
    let mut grow = coffer_tests::data(2, 200 << 10, true);
    grow.extend(coffer_tests::data(3 + round, 20 << 10, false));
    std::fs::write(src.join("grow"), grow).unwrap();
    let len = rng.gen_range(64 << 10..400 << 10);
    std::fs::write(
        src.join(format!("new-{round}")),
        coffer_tests::data(10_000 + round, len, false),
    )
    .unwrap();
    src
}

/// Bob's sources: the same `shared` file as Alice's (deduplicated across users) and one of his
/// own.
fn source_b(base: &Path, round: u64, rng: &mut StdRng) -> PathBuf {
    let src = base.join(format!("src-{round}-b"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("shared"), coffer_tests::data(1, 300 << 10, false)).unwrap();
    let len = rng.gen_range(32 << 10..300 << 10);
    std::fs::write(
        src.join(format!("own-{round}")),
        coffer_tests::data(50_000 + round, len, false),
    )
    .unwrap();
    src
}

/// What one client saw.
#[derive(Debug, Default)]
struct Oracle {
    /// The client's configuration (its user).
    cfg: PathBuf,
    /// Acknowledged snapshots, not deleted: id → source.
    acked: BTreeMap<String, PathBuf>,
    /// Every source a backup was attempted of, by the path the snapshot records.
    attempted: HashMap<String, PathBuf>,
    /// Deletions acknowledged.
    deleted: BTreeSet<String>,
    /// Deletions attempted, not acknowledged: either outcome is right.
    deleting: BTreeSet<String>,
}

fn snapshot_id(out: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(out.lines().last()?).ok()?;
    Some(v["snapshot"].as_str()?.to_string())
}

/// One round of client work, stopping at the first failure (the power is out): Alice backs up
/// (then deletes and runs maintenance every third round) while Bob backs up. Returns the ids
/// acknowledged in the round, Alice's and Bob's.
fn workload(
    rig: &Rig,
    round: u64,
    oracle: &mut Oracle,
    bob: &mut Oracle,
    rng: &mut StdRng,
) -> (Vec<String>, Vec<String>) {
    let src_b = source_b(rig.base(), round, rng);
    let canon = std::fs::canonicalize(&src_b).unwrap();
    bob.attempted
        .insert(canon.to_string_lossy().into_owned(), src_b.clone());
    let cfg_b = bob.cfg.clone();
    let arg = src_b.to_str().unwrap().to_string();
    let b = std::thread::spawn(move || {
        coffer(&cfg_b, &["snapshot", "create", "--json", &arg]).unwrap()
    });
    let a = workload_a(rig, round, oracle, rng);
    let (rc, out, _) = b.join().unwrap();
    let mut fresh_b = Vec::new();
    if rc == 0 {
        let id = snapshot_id(&out).expect("an acknowledged backup names its snapshot");
        bob.acked.insert(id.clone(), src_b);
        fresh_b.push(id);
    }
    (a, fresh_b)
}

fn workload_a(rig: &Rig, round: u64, oracle: &mut Oracle, rng: &mut StdRng) -> Vec<String> {
    let ctl = rig.fs.control();
    let mut acked = Vec::new();
    let src = source(rig.base(), round, rng);
    let canon = std::fs::canonicalize(&src).unwrap();
    oracle
        .attempted
        .insert(canon.to_string_lossy().into_owned(), src.clone());
    let (rc, out, _) = coffer(
        &rig.cfg,
        &["snapshot", "create", "--json", src.to_str().unwrap()],
    )
    .unwrap();
    if rc != 0 {
        return acked;
    }
    let id = snapshot_id(&out).expect("an acknowledged backup names its snapshot");
    oracle.acked.insert(id.clone(), src);
    acked.push(id);
    // Every third round: delete the oldest snapshot and run maintenance (forget, GC, compaction).
    if round % 3 == 2 && oracle.acked.len() > 3 && !ctl.crashed() {
        let victim = oracle.acked.keys().next().cloned().unwrap();
        oracle.deleting.insert(victim.clone());
        let (rc, _, _) = coffer(&rig.cfg, &["snapshot", "delete", &victim]).unwrap();
        if rc != 0 {
            return acked;
        }
        oracle.deleting.remove(&victim);
        oracle.acked.remove(&victim);
        oracle.deleted.insert(victim);
        let repo = rig.app.repo_str();
        let _ = rig.app.run(&["maintenance", "run", "--repo", &repo]);
    }
    acked
}

fn listed(rig: &Rig, cfg: &Path) -> BTreeMap<String, String> {
    let (rc, out, err) = coffer(cfg, &["snapshot", "list", "--json"]).unwrap();
    assert_eq!(rc, 0, "{}: snapshot list: {out}{err}", rig.ctx());
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            (
                v["id"].as_str().unwrap().to_string(),
                v["path"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn restores(rig: &Rig, cfg: &Path, id: &str, src: &Path, what: &str) {
    let target = rig.base().join("restore");
    let _ = std::fs::remove_dir_all(&target);
    let (rc, out, err) = coffer(cfg, &["restore", id, target.to_str().unwrap()]).unwrap();
    assert_eq!(
        rc,
        0,
        "{}: {what}: snapshot {id} does not restore: {out}{err}",
        rig.ctx()
    );
    assert_eq!(
        describe(src).unwrap(),
        describe(&target).unwrap(),
        "{}: {what}: snapshot {id} restores different bytes",
        rig.ctx()
    );
}

/// The checks after a power cycle (the appliance is running).
fn check(rig: &Rig, oracle: &mut Oracle, fresh: &[String], rng: &mut StdRng) {
    let seed = rig.ctx();
    let cfg = oracle.cfg.clone();
    let list = listed(rig, &cfg);
    for id in oracle.acked.keys() {
        // A deletion in flight at the cut may have taken effect.
        assert!(
            list.contains_key(id) || oracle.deleting.contains(id),
            "{seed}: acknowledged snapshot {id} is gone after a power cut"
        );
    }
    for (id, path) in &list {
        assert!(
            !oracle.deleted.contains(id),
            "{seed}: snapshot {id} came back after its deletion was acknowledged"
        );
        if oracle.acked.contains_key(id) {
            continue;
        }
        // I4: a snapshot the client never saw acknowledged must be one it attempted, and
        // complete.
        let src = oracle
            .attempted
            .get(path)
            .unwrap_or_else(|| panic!("{seed}: snapshot {id} of {path} was never attempted"));
        if !oracle.deleting.remove(id) {
            restores(rig, &cfg, id, src, "an unacknowledged but committed backup");
        }
        oracle.acked.insert(id.clone(), src.clone());
    }
    // Deletions in flight that took effect.
    let gone: Vec<String> = oracle
        .deleting
        .iter()
        .filter(|id| !list.contains_key(*id))
        .cloned()
        .collect();
    for id in gone {
        oracle.deleting.remove(&id);
        oracle.acked.remove(&id);
        oracle.deleted.insert(id);
    }
    for id in fresh {
        if let Some(src) = oracle.acked.get(id) {
            restores(
                rig,
                &cfg,
                id,
                src,
                "acknowledged in the round before the cut",
            );
        }
    }
    if !oracle.acked.is_empty() {
        let k = rng.gen_range(0..oracle.acked.len());
        let (id, src) = oracle.acked.iter().nth(k).unwrap();
        restores(rig, &cfg, id, src, "an older acknowledged snapshot");
    }
}

/// What the power cuts hit, for the report and the coverage check (C3).
#[derive(Default)]
struct Cuts {
    by_class: BTreeMap<String, u64>,
    files: BTreeMap<&'static str, usize>,
    names_pending: usize,
    names_kept: usize,
    count: u64,
}

impl Cuts {
    /// Records a cut that hit `hit`, power-cycles the rig and returns the report's text.
    fn cycle(&mut self, rig: &mut Rig, hit: String, rng: &mut StdRng) -> String {
        let r = rig.power_cycle(rng.r#gen());
        self.names_kept += r.meta_kept;
        self.names_pending += r.meta_pending;
        for (k, v) in &r.files {
            *self.files.entry(k).or_default() += v;
        }
        *self.by_class.entry(hit).or_default() += 1;
        self.count += 1;
        format!("{r:?}")
    }
}

impl Cuts {
    /// Prints what the cuts hit; fails when a class of the write path was never cut (C3) or no
    /// start was cut short.
    fn report_and_check_coverage(&self, seed: u64, kept: usize, deleted: usize) {
        eprintln!("power cuts by the operation they hit:");
        for (c, n) in &self.by_class {
            eprintln!("  {n:4}  {c}");
        }
        eprintln!(
            "unsynced name operations at the cuts: {}, of which survived: {}; files with unsynced \
             data: {:?}; {} snapshots kept, {} deleted",
            self.names_pending, self.names_kept, self.files, kept, deleted
        );
        let missing: Vec<&&str> = MUST_CRASH_IN
            .iter()
            .filter(|c| !self.by_class.contains_key(**c))
            .collect();
        assert!(
            missing.is_empty(),
            "seed {seed}: never cut the power in {missing:?} (C3: every point at least once)"
        );
        assert!(
            self.by_class.keys().any(|k| k.starts_with("start: ")),
            "seed {seed}: no start was cut short"
        );
    }
}

/// Starts the appliance after a cut. When `cut_start`, the start itself is cut short at a random
/// one of its first `per_start` operations (recovery interrupted) and started again.
fn restart(rig: &mut Rig, cuts: &mut Cuts, mut cut_start: bool, per_start: u64, rng: &mut StdRng) {
    loop {
        if cut_start {
            rig.fs.control().crash_at(rng.gen_range(1..=per_start));
        }
        if rig.start().is_ok() {
            rig.fs.control().disarm();
            if !rig.fs.control().crashed() {
                return;
            }
        }
        let hit = format!(
            "start: {}",
            rig.fs.control().crashed_in().unwrap_or_default()
        );
        cut_start = false;
        let r = cuts.cycle(rig, hit.clone(), rng);
        rig.last_cut = format!("{hit}, survived: {r}; before it: {}", rig.last_cut);
    }
}

/// Rounds of work until the armed cut (or `rounds` rounds, then a cut at rest); the snapshots
/// acknowledged meanwhile and what the cut hit.
fn work_until_cut(
    rig: &Rig,
    round: &mut u64,
    rounds: u32,
    oracle: &mut Oracle,
    bob: &mut Oracle,
    rng: &mut StdRng,
) -> (Vec<String>, Vec<String>, String) {
    let ctl = rig.fs.control();
    let mut fresh = Vec::new();
    let mut fresh_b = Vec::new();
    for _ in 0..rounds {
        let (a, b) = workload(rig, *round, oracle, bob, rng);
        fresh.extend(a);
        fresh_b.extend(b);
        *round += 1;
        if ctl.crashed() {
            break;
        }
    }
    if !ctl.crashed() {
        // The cut comes after the work (a machine switched off at rest).
        ctl.crash_now();
    }
    (fresh, fresh_b, ctl.crashed_in().unwrap_or_default())
}

/// C2/C3: ≥ 200 power cuts at random operations (and at each class of the write path in turn)
/// during backups, deletions, maintenance and restarts.
#[test]
fn power_loss_anywhere_loses_nothing_acknowledged() {
    let seed = env_u64("COFFER_CRASH_SEED").unwrap_or_else(rand::random);
    let points = env_u64("COFFER_CRASH_POINTS").unwrap_or(200);
    let verbose = std::env::var_os("COFFER_CRASH_VERBOSE").is_some();
    eprintln!(
        "power-loss test: seed {seed} ({points} crash points; COFFER_CRASH_SEED={seed} to rerun)"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rig = Rig::new(seed, 4096 * MIB);
    let mut oracle = Oracle {
        cfg: rig.cfg.clone(),
        ..Oracle::default()
    };
    let mut bob = Oracle {
        cfg: rig.cfg_b.clone(),
        ..Oracle::default()
    };
    rig.start().expect("first start");
    // Warm-up rounds without cuts measure how many operations a round and a start take.
    let mut per_round = 0;
    for round in 0..4 {
        let before = rig.fs.control().ops();
        let (fresh, fresh_b) = workload(&rig, round, &mut oracle, &mut bob, &mut rng);
        assert_eq!(
            fresh.len() + fresh_b.len(),
            2,
            "round {round} without faults failed"
        );
        per_round = per_round.max(rig.fs.control().ops() - before);
    }
    rig.app.stop().unwrap();
    let ctl = rig.fs.control();
    let before = ctl.ops();
    rig.start().unwrap();
    let per_start = (ctl.ops() - before).max(1);
    eprintln!("a round takes about {per_round} file system operations, a start {per_start}");

    let mut cuts = Cuts::default();
    let mut round = 4;
    let mut targeted = 0;
    // After the planned cuts, classes of the write path not met yet get up to 4 more tries each
    // (a class can be rare in a short run: a new `packs/<xx>/`, a pack deleted whole).
    let mut top_up = 0;
    loop {
        let unmet: Vec<&str> = MUST_CRASH_IN[..MUST_CRASH_IN.len() - 1]
            .iter()
            .copied()
            .filter(|c| !cuts.by_class.contains_key(*c))
            .collect();
        if cuts.count >= points && (unmet.is_empty() || top_up >= 4 * MUST_CRASH_IN.len()) {
            break;
        }
        let ctl = rig.fs.control();
        // Every third cut aims at a class of the write path (in turn; it may take a few rounds
        // to meet it: a new `packs/<xx>/`, a seal), the others at a random operation of a round.
        let rounds = if cuts.count >= points {
            top_up += 1;
            ctl.crash_at_class(unmet[top_up % unmet.len()], 1);
            8
        } else if cuts.count % 3 == 0 {
            let class = MUST_CRASH_IN[targeted % (MUST_CRASH_IN.len() - 1)];
            targeted += 1;
            ctl.crash_at_class(class, rng.gen_range(1..=2));
            8
        } else {
            ctl.crash_at(ctl.ops() + rng.gen_range(1..=per_round + per_round / 5));
            1
        };
        let (fresh, fresh_b, hit) =
            work_until_cut(&rig, &mut round, rounds, &mut oracle, &mut bob, &mut rng);
        let r = cuts.cycle(&mut rig, hit.clone(), &mut rng);
        rig.last_cut = format!("{hit} in round {}, survived: {r}", round - 1);
        if verbose {
            eprintln!(
                "cut {}: {}; acknowledged {fresh:?} {fresh_b:?}",
                cuts.count, rig.last_cut
            );
        }
        // One start in four is itself cut short.
        let cut_start = cuts.count % 4 == 1;
        restart(&mut rig, &mut cuts, cut_start, per_start, &mut rng);
        check(&rig, &mut oracle, &fresh, &mut rng);
        check(&rig, &mut bob, &fresh_b, &mut rng);
        let (rc, out) = rig.app.verify(cuts.count % 10 == 0).unwrap();
        assert_eq!(rc, 0, "{}: verify after a power cut: {out}", rig.ctx());
    }
    cuts.report_and_check_coverage(
        seed,
        oracle.acked.len() + bob.acked.len(),
        oracle.deleted.len(),
    );
    // The end: every acknowledged snapshot, verify with data, and the index rebuilt from the
    // packs (I5).
    for o in [&oracle, &bob] {
        for (id, src) in &o.acked {
            restores(&rig, &o.cfg, id, src, "at the end");
        }
    }
    rig.app.stop().unwrap();
    let (rc, out) = rig.app.verify(true).unwrap();
    assert_eq!(rc, 0, "seed {seed}: final verify --read-data: {out}");
    rebuilt_index_equals_live(&rig);
}

/// Chunk entries (32-byte keys) of every shard index under `dir`.
fn index_entries(dir: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    for shard in std::fs::read_dir(dir).unwrap() {
        let path = shard.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("shard-")
        {
            continue;
        }
        let db = rocksdb::DB::open_for_read_only(&rocksdb::Options::default(), &path, false)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        for kv in db.iterator(rocksdb::IteratorMode::Start) {
            let (k, v) = kv.unwrap();
            if k.len() == 32 {
                out.insert(k.to_vec(), v.to_vec());
            }
        }
    }
    out
}

/// I5: `rebuild-index` (from pack footers and records alone) finds every live entry. Where a
/// chunk is stored twice (a record written again after a cut lost its acknowledgement, or
/// compaction's copy) the rebuilt entry may name the other copy: `verify --read-data` on the
/// rebuilt index then proves that every entry it holds reads back and hashes to its id.
fn rebuilt_index_equals_live(rig: &Rig) {
    let live = index_entries(&rig.app.repo.join("index"));
    let out = admin(&rig.app, &["rebuild-index"]);
    let rebuilt = index_entries(&rig.app.repo.join("index"));
    let missing: Vec<String> = live
        .keys()
        .filter(|k| !rebuilt.contains_key(*k))
        .map(hex::encode)
        .collect();
    assert!(
        missing.is_empty(),
        "{}: {} of {} live index entries are not in the index rebuilt from the packs: {:?}\n{out}",
        rig.ctx(),
        missing.len(),
        live.len(),
        &missing[..missing.len().min(5)]
    );
    let elsewhere = live.iter().filter(|(k, v)| rebuilt[*k] != **v).count();
    let (rc, verified) = rig.app.verify(true).unwrap();
    assert_eq!(
        rc,
        0,
        "{}: verify --read-data of the rebuilt index: {verified}",
        rig.ctx()
    );
    eprintln!(
        "I5: {} live entries, all in the rebuilt index ({} entries, {elsewhere} pointing at \
         another copy of the same chunk), which verifies clean",
        live.len(),
        rebuilt.len()
    );
}

/// A backup of a new source; the snapshot id when acknowledged, else the client's error.
fn backup(rig: &Rig, round: u64, rng: &mut StdRng) -> (PathBuf, Result<String, String>) {
    let src = source(rig.base(), round, rng);
    let (rc, out, err) = coffer(
        &rig.cfg,
        &["snapshot", "create", "--json", src.to_str().unwrap()],
    )
    .unwrap();
    let res = if rc == 0 {
        Ok(snapshot_id(&out).expect("a summary"))
    } else {
        Err(format!("{out}{err}"))
    };
    (src, res)
}

/// After a power cycle: every acknowledged snapshot restores, verify --read-data is clean.
fn all_restore_after_power_loss(rig: &mut Rig, acked: &[(String, PathBuf)], seed: u64) {
    rig.power_cycle(seed);
    rig.start().expect("start after the power cut");
    let list = listed(rig, &rig.cfg);
    for (id, src) in acked {
        assert!(list.contains_key(id), "acknowledged snapshot {id} lost");
        restores(rig, &rig.cfg, id, src, "after faults and a power cut");
    }
    rig.app.stop().unwrap();
    let (rc, out) = rig.app.verify(true).unwrap();
    assert_eq!(rc, 0, "verify --read-data: {out}");
}

/// A started rig on a 4 GiB file system with one acknowledged backup (seeded by `seed`).
fn started_with_one_backup(seed: u64) -> (Rig, StdRng, Vec<(String, PathBuf)>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rig = Rig::new(seed, 4096 * MIB);
    rig.start().unwrap();
    let (src, res) = backup(&rig, 0, &mut rng);
    let acked = vec![(res.expect("a backup without faults"), src)];
    (rig, rng, acked)
}

/// C4: a failed `fsync` of a pack. The writes it covered are lost for good (as on Linux, a later
/// `fsync` does not bring them back): nothing of them may have been acknowledged, the pack is
/// never written again, the next backup succeeds, and after a power cut everything acknowledged
/// restores.
#[test]
fn a_failed_fsync_is_never_acknowledged_and_its_pack_never_reused() {
    let (mut rig, mut rng, mut acked) = started_with_one_backup(7);
    let ctl = rig.fs.control();
    ctl.fail(Fault {
        op: Op::Fsync,
        path: "packs/".into(),
        errno: libc::EIO,
        times: 1,
    });
    let (src, res) = backup(&rig, 1, &mut rng);
    let fired = ctl.fired();
    assert_eq!(fired.len(), 1, "the fsync fault fired once: {fired:?}");
    let poisoned = fired[0].1.clone();
    let writes = ctl.writes_to(&poisoned);
    eprintln!("backup with a failed pack fsync ({poisoned}): {res:?}");
    if let Ok(id) = res {
        // The client may retry; then what it was told is stored must be durable elsewhere.
        acked.push((id, src));
    } else if let Err(e) = &res {
        assert!(
            e.contains("fdatasync") || e.contains("storage") || e.contains("pack"),
            "the error names what failed: {e}"
        );
    }
    let (src, res) = backup(&rig, 2, &mut rng);
    acked.push((res.expect("the next backup succeeds on a new pack"), src));
    assert_eq!(
        ctl.writes_to(&poisoned),
        writes,
        "the pack whose fsync failed was written again"
    );
    all_restore_after_power_loss(&mut rig, &acked, 8);
}

/// C4: disk full. The appliance refuses a backup that would eat its reserve with
/// `RESOURCE_EXHAUSTED` and a message that says so; when space returns, the next backup succeeds
/// without a restart. A write that fails with `ENOSPC` (or `EIO`) itself is no different: the
/// backup fails clearly, nothing is acknowledged that is not durable, and service resumes.
#[test]
fn disk_full_and_io_errors_are_clear_and_service_resumes() {
    let (mut rig, mut rng, mut acked) = started_with_one_backup(11);
    let ctl = rig.fs.control();
    // Room for the reserve (8 MiB at this size) and a little more: the next backup's new data
    // does not fit.
    ctl.set_capacity(ctl.used() + 8 * MIB + 100 * 1024);
    let (_, res) = backup(&rig, 1, &mut rng);
    let e = res.expect_err("a backup past the reserve is refused");
    assert!(
        e.contains("resource") || e.contains("RESOURCE_EXHAUSTED") || e.contains("No space"),
        "the client is told the appliance is full: {e}"
    );
    eprintln!("disk full: {e}");
    ctl.set_capacity(4096 * MIB);
    let (src, res) = backup(&rig, 2, &mut rng);
    acked.push((res.expect("service resumes when space returns"), src));
    // Errors from the file system itself, on packs and on the index.
    for (k, (op, path, errno)) in [
        (Op::Write, "packs/", libc::ENOSPC),
        (Op::Write, "packs/", libc::EIO),
        (Op::Write, "index/", libc::ENOSPC),
        (Op::Write, "index/", libc::EIO),
        (Op::Fsync, "index/", libc::EIO),
    ]
    .into_iter()
    .enumerate()
    {
        let round = 10 + 2 * k as u64;
        ctl.fail(Fault {
            op,
            path: path.into(),
            errno,
            times: 1,
        });
        let (src, res) = backup(&rig, round, &mut rng);
        eprintln!("{op:?} {path} errno {errno} ({:?}): {res:?}", ctl.fired());
        if let Ok(id) = res {
            acked.push((id, src));
        }
        let (src, res) = backup(&rig, round + 1, &mut rng);
        match res {
            Ok(id) => acked.push((id, src)),
            // RocksDB stops writing after an I/O error in its log and has no resume call in
            // the Rust binding: the index answers errors until the appliance restarts (no data
            // is at risk meanwhile). Only that case may need the restart.
            Err(e) if path == "index/" && errno == libc::EIO => {
                assert!(e.contains("storage failure"), "a clear error: {e}");
                rig.app.kill();
                rig.start().unwrap();
                let (src, res) = backup(&rig, round + 1, &mut rng);
                acked.push((res.expect("service after a restart"), src));
            }
            Err(e) => panic!("{op:?} {path} errno {errno}: service did not resume: {e}"),
        }
    }
    all_restore_after_power_loss(&mut rig, &acked, 12);
}
