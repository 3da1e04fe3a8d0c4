//! Issue 5: listeners (unix socket, systemd socket activation), graceful SIGTERM, the tuning
//! plan and the refusals that protect a misconfigured start.

use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use coffer_tests::{
    bin, coffer, connect_url, create_snapshot, data, describe, listening, sigterm, Appliance,
    REPO_PASSWORD, USER_PASSWORD,
};

fn appliance() -> Command {
    let mut c = Command::new(bin("coffer-appliance"));
    c.env("COFFER_REPO_PASSWORD", REPO_PASSWORD)
        .env("COFFER_USER_PASSWORD", USER_PASSWORD)
        .env("COFFER_LOG", "info");
    c
}

fn tree(root: &Path) {
    for i in 0..30u64 {
        let d = root.join(format!("d{}", i % 3));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join(format!("f{i}")),
            data(i, 1000 + 4099 * usize::try_from(i).unwrap(), i % 2 == 0),
        )
        .unwrap();
    }
}

fn backup_restore_exact(dir: &Path, cfg: &Path, src: &Path, name: &str) {
    let snap = create_snapshot(cfg, src);
    let target = dir.join(name);
    let id = snap["snapshot"].as_str().unwrap();
    let (rc, out, err) = coffer(cfg, &["restore", id, target.to_str().unwrap()]).unwrap();
    assert_eq!(rc, 0, "{out}{err}");
    assert_eq!(describe(src).unwrap(), describe(&target).unwrap());
}

/// systemd socket activation: a listening TCP socket passed as fd 3 with LISTEN_FDS=1 and
/// LISTEN_PID; `--listen` is ignored; a client backs up and restores through it; SIGTERM
/// exits 0.
#[test]
fn socket_activation_serves_on_the_passed_socket() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::init(dir.path(), 1, 64 << 10, &["alice@laptop"]).unwrap();
    let sock = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    // fd 0 of the shell is the socket; it moves it to fd 3 and execs the appliance with its own
    // pid in LISTEN_PID, as systemd does.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("exec 3<&0 0</dev/null; LISTEN_FDS=1 LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(bin("coffer-appliance"))
        .args([
            "serve",
            "--repo",
            &app.repo_str(),
            "--listen",
            "127.0.0.1:1",
        ])
        .arg("--tls-generate-cert")
        .arg("--tls-cert-file")
        .arg(dir.path().join("c.pem"))
        .arg("--tls-key-file")
        .arg(dir.path().join("k.pem"))
        .env("COFFER_REPO_PASSWORD", REPO_PASSWORD)
        .stdin(Stdio::from(OwnedFd::from(sock)))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (listen, fp) = listening(&mut child);
    assert_eq!(listen, addr.to_string(), "the passed socket, not --listen");
    let cfg = dir.path().join("client.json");
    connect_url(&cfg, &format!("https://{addr}"), &fp, "alice", "laptop");
    let src = dir.path().join("src");
    tree(&src);
    backup_restore_exact(dir.path(), &cfg, &src, "restored");
    assert_eq!(sigterm(&mut child), Some(0));
}

/// `--listen unix:/path` with `--listen-mode`: the socket has that mode, a client backs up and
/// restores through it (`unix:` URL, TLS as usual), and the socket is removed at shutdown.
#[test]
fn unix_socket_listener() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::init(dir.path(), 1, 64 << 10, &["alice@laptop"]).unwrap();
    let path = dir.path().join("coffer.sock");
    let mut child = appliance()
        .args(["serve", "--repo", &app.repo_str(), "--listen-mode", "600"])
        .arg("--listen")
        .arg(format!("unix:{}", path.display()))
        .arg("--tls-generate-cert")
        .arg("--tls-cert-file")
        .arg(dir.path().join("c.pem"))
        .arg("--tls-key-file")
        .arg(dir.path().join("k.pem"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (listen, fp) = listening(&mut child);
    assert_eq!(listen, format!("unix:{}", path.display()));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let cfg = dir.path().join("client.json");
    connect_url(&cfg, &listen, &fp, "alice", "laptop");
    let src = dir.path().join("src");
    tree(&src);
    backup_restore_exact(dir.path(), &cfg, &src, "restored");
    assert_eq!(sigterm(&mut child), Some(0));
    assert!(!path.exists(), "socket removed at shutdown");
}

/// `tune --json` on this machine: every CPU found, features detected, a placement per shard on
/// distinct CPUs; `serve` refuses, with a clear message, more shards than CPUs and a memlock
/// limit too low for io_uring.
#[test]
fn tuning_plan_and_refusals() {
    let out = appliance().args(["tune", "--json"]).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(v["hardware"]["cpus"].as_array().unwrap().len(), cpus);
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        v["hardware"]["features"]["aes_ni"].as_bool(),
        Some(std::arch::is_x86_feature_detected!("aes"))
    );
    let shards = v["plan"]["shards"].as_array().unwrap();
    assert_eq!(shards.len(), cpus, "one shard per CPU by default");
    let mut used: Vec<u64> = shards.iter().map(|s| s["cpu"].as_u64().unwrap()).collect();
    used.sort_unstable();
    used.dedup();
    assert_eq!(used.len(), cpus, "each shard on its own CPU");
    assert!(v["plan"]["network_threads"].as_u64().unwrap() >= 1);
    let in_cores: usize = v["hardware"]["cores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_array().unwrap().len())
        .sum();
    assert_eq!(in_cores, cpus, "every CPU belongs to one physical core");
    assert!(v["hardware"]["memory_bytes"].as_u64().unwrap() > 0);
    assert!(!v["hardware"]["io_uring"]["kernel"]
        .as_str()
        .unwrap()
        .is_empty());
    assert!(v["plan"]["index_cache_bytes"].as_u64().unwrap() > 0);
    assert!(v["plan"]["pack_target_bytes"].as_u64().unwrap() > 0);
    assert!(v["plan"]["ring_depth"].as_u64().unwrap() > 0);

    let dir = tempfile::tempdir().unwrap();
    let serve = |repo: &str, prefix: &[&str]| {
        let mut c = Command::new(prefix.first().copied().unwrap_or("env"));
        let tls = Path::new(repo).with_extension("tls");
        std::fs::create_dir_all(&tls).unwrap();
        c.args(prefix.get(1..).unwrap_or_default())
            .arg(bin("coffer-appliance"))
            .args(["serve", "--repo", repo, "--listen", "127.0.0.1:0"])
            .arg("--tls-generate-cert")
            .arg("--tls-cert-file")
            .arg(tls.join("c.pem"))
            .arg("--tls-key-file")
            .arg(tls.join("k.pem"))
            .env("COFFER_REPO_PASSWORD", REPO_PASSWORD)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let many = dir.path().join("many");
    let out = appliance()
        .args(["init", "--repo", many.to_str().unwrap(), "--shards"])
        .arg((cpus + 1).to_string())
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = serve(many.to_str().unwrap(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("shards but only") && err.contains("CPUs"),
        "{err}"
    );

    std::fs::create_dir_all(dir.path().join("one")).unwrap();
    let app = Appliance::init(&dir.path().join("one"), 1, 64 << 10, &[]).unwrap();
    // With a repository: its shard count, and the disk under it.
    let out = appliance()
        .args(["tune", "--json", "--repo", &app.repo_str()])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["plan"]["shards"].as_array().unwrap().len(), 1);
    let dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(&app.repo).unwrap());
    let (major, minor) = (
        ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff),
        (dev & 0xff) | ((dev >> 12) & !0xff),
    );
    if Path::new(&format!("/sys/dev/block/{major}:{minor}")).exists() {
        assert!(
            !v["hardware"]["disks"].as_array().unwrap().is_empty(),
            "the disk under the repository: {v}"
        );
    }
    let out = serve(&app.repo_str(), &["prlimit", "--memlock=65536:65536", "--"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("RLIMIT_MEMLOCK") && err.contains("LimitMEMLOCK"),
        "{err}"
    );
}

/// SIGTERM during an upload: the appliance finishes in-flight work and exits 0, the client says
/// clearly that the backup was interrupted, what was acknowledged is intact (verify --read-data),
/// and the next backup completes.
#[test]
fn sigterm_during_upload() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 1, 64 << 10, &["alice@laptop"]).unwrap();
    app.start().unwrap();
    let cfg = dir.path().join("client.json");
    coffer_tests::connect_client(&app, &cfg, "alice", "laptop");
    let src = dir.path().join("big");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..12u64 {
        std::fs::write(src.join(format!("f{i}")), data(100 + i, 24 << 20, false)).unwrap();
    }
    let client = Command::new(bin("coffer"))
        .args(["snapshot", "create", src.to_str().unwrap()])
        .env("COFFER_CONFIG", &cfg)
        .env("COFFER_PASSWORD", USER_PASSWORD)
        .env("XDG_CACHE_HOME", dir.path().join("cache"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the appliance has stored something of this backup, then stop it.
    let start = std::time::Instant::now();
    while app.pack_bytes().map_or(0, |b| b.0) < 16 << 20 {
        assert!(start.elapsed().as_secs() < 60, "the upload never started");
        // Polling a condition (the pack files growing), not a timed wait.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(app.stop().unwrap(), Some(0), "SIGTERM exits 0");
    let out = client.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(0),
        "the interrupted backup must not succeed"
    );
    assert!(
        err.contains("connection to the appliance was lost") && !err.contains("panicked"),
        "a clear error, no panic: {err}"
    );
    let (rc, out) = app.verify(true).unwrap();
    assert_eq!(rc, 0, "{out}");
    app.start().unwrap();
    coffer_tests::connect_client(&app, &cfg, "alice", "laptop");
    backup_restore_exact(dir.path(), &cfg, &src, "restored");
}
