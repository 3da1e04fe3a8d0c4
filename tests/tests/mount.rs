//! `coffer mount` (issue 18): a snapshot of a tree with every node kind reads back through FUSE
//! as recorded (`diff -r`, `stat`, the F4 description: modes, times, sizes, contents, symlinks,
//! hard links); a directory of thousands of entries lists whole (several tree parts); files read
//! in parallel; a 1 GiB file reads with `dd`; access rules apply (a snapshot whose rule is
//! removed leaves the mount); SIGTERM and `coffer umount` unmount cleanly.

use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use coffer_tests::{
    acl_add, admin, bin, connect_client, create_snapshot, describe, eventually, Appliance,
};

const ALICE: &str = "alice@laptop";
const BOB: &str = "bob@desktop";

/// FUSE is there (`.ci/run` installs fuse3; a container may lack /dev/fuse).
fn fuse() -> bool {
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    eprintln!("skipped: /dev/fuse is absent, so FUSE cannot mount here");
    false
}

/// A running `coffer mount`; unmounted (SIGTERM) when dropped.
struct Mount {
    child: Child,
    at: PathBuf,
}

impl Mount {
    fn start(cfg: &Path, at: &Path) -> Self {
        Self::start_with(cfg, at, &[])
    }

    fn start_with(cfg: &Path, at: &Path, extra: &[&str]) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let child = Command::new(bin("coffer"))
            .args(["--config"])
            .arg(cfg)
            .args(["mount", "--refresh", "1", "--cache-size", "64M"])
            .args(extra)
            .arg(at)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut m = Self {
            child,
            at: at.to_path_buf(),
        };
        assert!(
            eventually(Duration::from_secs(20), || m.mounted()),
            "the mount did not appear: {}",
            m.stderr()
        );
        m
    }

    fn mounted(&self) -> bool {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let at = self.at.canonicalize().unwrap();
        mounts
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(at.to_str().unwrap()) && l.contains("fuse"))
    }

    fn stderr(&mut self) -> String {
        let _ = self.child.kill();
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    /// SIGTERM; answers the exit code.
    fn stop(&mut self) -> Option<i32> {
        coffer_tests::sigterm(&mut self.child)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.stop();
        }
        if self.mounted() {
            let _ = Command::new("fusermount3").arg("-u").arg(&self.at).status();
        }
    }
}

fn set_mtime(p: &Path, secs: u64) {
    let f = std::fs::File::options().write(true).open(p).unwrap();
    f.set_modified(
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(123_456_789),
    )
    .unwrap();
}

/// A tree with every node kind: nested directories with their own modes, empty, small
/// (bundled), multi-chunk and sparse files, odd names (spaces, UTF-8, bytes that are not
/// UTF-8), relative, absolute and dangling symlinks, a hard-link pair, and a directory of 4000
/// entries.
fn make_tree(src: &Path) {
    let deep = src.join("a").join("b c").join("ünï");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    std::fs::write(src.join("small.txt"), b"hello, mount\n").unwrap();
    std::fs::write(
        deep.join("multi.bin"),
        coffer_tests::data(7, 3 << 20, false),
    )
    .unwrap();
    std::fs::write(
        src.join("a").join("text.log"),
        coffer_tests::data(8, 700 << 10, true),
    )
    .unwrap();
    let sparse = std::fs::File::create(src.join("sparse")).unwrap();
    sparse.set_len(5 << 20).unwrap();
    drop(sparse);
    std::fs::write(
        src.join(std::ffi::OsStr::from_bytes(b"raw-\xff\xfe")),
        b"not utf-8 name\n",
    )
    .unwrap();
    std::fs::write(src.join("secret"), b"0600\n").unwrap();
    std::fs::set_permissions(src.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(src.join("tool.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(src.join("tool.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("a/text.log", src.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", src.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("nowhere/at/all", src.join("dangling")).unwrap();
    std::fs::hard_link(src.join("small.txt"), src.join("a").join("small-again.txt")).unwrap();
    let many = src.join("many");
    std::fs::create_dir(&many).unwrap();
    for i in 0..4000 {
        std::fs::write(
            many.join(format!("entry-with-a-longish-name-{i:05}")),
            format!("{i}\n"),
        )
        .unwrap();
    }
    for (p, t) in [
        (src.join("small.txt"), 1_600_000_000),
        (deep.join("multi.bin"), 1_650_000_000),
        (src.join("sparse"), 1_500_000_000),
    ] {
        set_mtime(&p, t);
    }
    std::fs::set_permissions(
        src.join("a").join("b c"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn stat(p: &Path) -> String {
    let (ok, out) = run(Command::new("stat")
        .args(["-c", "%A %u %g %s %Y %h %F"])
        .arg(p));
    assert!(ok, "{out}");
    out
}

fn hash_file(p: &Path) -> blake3::Hash {
    hash_open(std::fs::File::open(p).unwrap())
}

fn hash_open(mut f: std::fs::File) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.finalize();
        }
        h.update(&buf[..n]);
    }
}

#[test]
fn a_mounted_snapshot_reads_back_as_recorded_and_unmounts_cleanly() {
    if !fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 2, 64 << 10, &[ALICE, BOB]).unwrap();
    app.start().unwrap();
    let cfg = dir.path().join("alice.toml");
    connect_client(&app, &cfg, "alice", "laptop");
    let src = dir.path().join("src");
    make_tree(&src);
    let id = create_snapshot(&cfg, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_string();

    let at = dir.path().join("mnt");
    let mut m = Mount::start(&cfg, &at);
    let snap = at.join("ids").join(&id);
    // Every entry as recorded: kind, mode, mtime (ns), size, content, symlink target, and which
    // names share an inode.
    assert_eq!(describe(&src).unwrap(), describe(&snap).unwrap());
    let (ok, out) = run(Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(&src)
        .arg(&snap));
    assert!(ok, "diff -r found differences: {out}");
    for rel in [
        "small.txt",
        "a/small-again.txt",
        "secret",
        "tool.sh",
        "rel-link",
        "sparse",
        "a/b c/ünï/multi.bin",
    ] {
        assert_eq!(stat(&src.join(rel)), stat(&snap.join(rel)), "stat of {rel}");
    }
    // Directories: the same mode, owner and time (their size and link count are the file
    // system's own).
    let dir_stat = |p: &Path| run(Command::new("stat").args(["-c", "%A %u %g %Y"]).arg(p)).1;
    assert_eq!(dir_stat(&src.join("a/b c")), dir_stat(&snap.join("a/b c")));
    assert_eq!(
        std::fs::read_dir(snap.join("many")).unwrap().count(),
        4000,
        "a directory of several tree parts lists whole"
    );
    // The views: by host and by path, each with `latest`.
    let by_host = at.join("hosts").join("laptop");
    let latest = std::fs::read_link(by_host.join("latest")).unwrap();
    assert_eq!(
        describe(&by_host.join(&latest)).unwrap(),
        describe(&src).unwrap()
    );
    let path_name = src
        .to_str()
        .unwrap()
        .trim_start_matches('/')
        .replace('/', "%2F");
    assert!(at
        .join("paths")
        .join(&path_name)
        .join(&latest)
        .join("small.txt")
        .is_file());
    // Nothing can be written.
    let err = std::fs::write(snap.join("new-file"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    // Several readers at once, each sees its file whole.
    let files = ["a/b c/ünï/multi.bin", "a/text.log", "sparse", "small.txt"];
    let readers: Vec<_> = files
        .iter()
        .map(|f| {
            let (a, b) = (src.join(f), snap.join(f));
            std::thread::spawn(move || (hash_file(&a), hash_file(&b)))
        })
        .collect();
    for (r, f) in readers.into_iter().zip(files) {
        let (want, got) = r.join().unwrap();
        assert_eq!(want, got, "{f} read in parallel");
    }

    // SIGTERM unmounts and exits 0, even while a file inside is open (busy: detached lazily).
    let busy = std::fs::File::open(snap.join("small.txt")).unwrap();
    assert_eq!(m.stop(), Some(0));
    assert!(!m.mounted(), "still mounted after SIGTERM");
    drop(busy);

    access_rules_apply_to_the_mount(&app, dir.path(), &id);
}

/// Access rules apply as for restore: bob sees nothing of alice's until a rule lets him, and the
/// snapshot leaves his mount once the rule is removed; `coffer umount` ends his mount.
fn access_rules_apply_to_the_mount(app: &Appliance, dir: &Path, id: &str) {
    let bob_cfg = dir.join("bob.toml");
    connect_client(app, &bob_cfg, "bob", "desktop");
    let bob_at = dir.join("bob-mnt");
    let mut bm = Mount::start(&bob_cfg, &bob_at);
    assert_eq!(std::fs::read_dir(bob_at.join("ids")).unwrap().count(), 0);
    assert!(!bob_at.join("ids").join(id).exists());
    admin(app, &["acl", "enable"]);
    let rule = acl_add(app, "bob@*", "READ", "type=snapshot,username=alice");
    assert!(
        eventually(Duration::from_secs(10), || bob_at
            .join("ids")
            .join(id)
            .join("small.txt")
            .is_file()),
        "bob's mount does not show the snapshot the rule lets him read"
    );
    assert_eq!(
        std::fs::read(bob_at.join("ids").join(id).join("small.txt")).unwrap(),
        b"hello, mount\n"
    );
    // A file opened before the rule goes is refused after it.
    let mut held = std::fs::File::open(bob_at.join("ids").join(id).join("a/text.log")).unwrap();
    admin(app, &["acl", "remove", &rule, "--delete"]);
    assert!(
        eventually(Duration::from_secs(10), || std::fs::read_dir(
            bob_at.join("ids")
        )
        .unwrap()
        .count()
            == 0),
        "the snapshot stays in bob's mount after the rule is gone"
    );
    assert!(
        eventually(Duration::from_secs(10), || !bob_at
            .join("ids")
            .join(id)
            .join("small.txt")
            .exists()),
        "a path into the revoked snapshot still resolves"
    );
    let mut b = vec![0; 4096];
    let e = held
        .read(&mut b)
        .expect_err("a handle opened before the rule was removed still reads");
    // EACCES: refused by the mount itself, not only by the appliance (which answers ENOENT).
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    drop(held);
    // `coffer umount` from outside: the mount process ends by itself.
    let (ok, out) = run(Command::new(bin("coffer")).arg("umount").arg(&bob_at));
    assert!(ok, "{out}");
    let mut done = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            done = bm.child.try_wait().unwrap();
            done.is_some()
        }),
        "coffer mount still runs after coffer umount"
    );
    assert_eq!(done.unwrap().code(), Some(0));
    assert!(!bm.mounted());
}

#[test]
fn a_large_file_reads_with_dd_and_matches() {
    if !fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 2, 1 << 20, &[ALICE]).unwrap();
    app.start().unwrap();
    let cfg = dir.path().join("alice.toml");
    connect_client(&app, &cfg, "alice", "laptop");
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(src.join("big")).unwrap());
        for k in 0..64 {
            f.write_all(&coffer_tests::data(1000 + k, 16 << 20, false))
                .unwrap();
        }
    }
    let id = create_snapshot(&cfg, &src)["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let at = dir.path().join("mnt");
    let disk = dir.path().join("disk-cache");
    let mut m = Mount::start_with(&cfg, &at, &["--disk-cache", disk.to_str().unwrap()]);
    let big = at.join("ids").join(&id).join("big");
    // Random access first, before anything of the file is in the page cache: reads far into
    // it, then back near the start, on one handle.
    {
        use std::os::unix::fs::FileExt;
        let mounted = std::fs::File::open(&big).unwrap();
        let source = std::fs::File::open(src.join("big")).unwrap();
        for off in [(700 << 20) + 4097, (3 << 20) + 123, (1 << 30) - 50_000] {
            let (mut got, mut want) = (vec![0; 100 << 10], vec![0; 100 << 10]);
            let n = mounted.read_at(&mut got, off).unwrap();
            assert_eq!(
                n,
                source.read_at(&mut want, off).unwrap(),
                "length at {off}"
            );
            assert!(got[..n] == want[..n], "a read at {off} differs");
        }
    }
    let (ok, out) = run(Command::new("dd")
        .arg(format!("if={}", big.display()))
        .args(["of=/dev/null", "bs=1M"]));
    assert!(ok, "{out}");
    assert!(
        out.contains("1073741824 bytes"),
        "dd read everything: {out}"
    );
    let want = hash_file(&src.join("big"));
    assert_eq!(hash_file(&big), want);

    // The disk cache: every chunk read is on disk (sealed: no 4 KiB of the file in clear)...
    let cached = || -> Vec<PathBuf> {
        let mounts: Vec<PathBuf> = std::fs::read_dir(&disk)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(mounts.len(), 1, "one directory per mount: {mounts:?}");
        std::fs::read_dir(&mounts[0])
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| !p.file_name().unwrap().as_bytes().starts_with(b"."))
            .collect()
    };
    let size = |files: &[PathBuf]| -> u64 {
        files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum()
    };
    assert!(
        eventually(Duration::from_mins(1), || size(&cached()) > 1 << 30),
        "the disk cache holds {} bytes",
        size(&cached())
    );
    let head = std::fs::read(src.join("big")).unwrap()[..4096].to_vec();
    for f in cached() {
        let b = std::fs::read(&f).unwrap();
        assert!(
            !b.windows(4096).any(|w| w == head.as_slice()),
            "{f:?} holds the file in clear"
        );
    }
    // ...and with the appliance gone and the page cache dropped, the file still reads whole
    // (64 MiB of memory cache: the rest comes from disk).
    let opened = std::fs::File::open(&big).unwrap();
    let (ok, out) = run(Command::new("dd")
        .arg(format!("if={}", big.display()))
        .args(["iflag=nocache", "count=0"]));
    assert!(ok, "{out}");
    app.stop().unwrap();
    assert_eq!(hash_open(opened), want, "read back from the disk cache");
    assert_eq!(m.stop(), Some(0));
    assert_eq!(
        std::fs::read_dir(&disk).unwrap().count(),
        0,
        "the disk cache is removed at unmount"
    );
}
