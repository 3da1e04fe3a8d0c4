//! Test support: runs the real `coffer-appliance` binary on `127.0.0.1:0` with a generated
//! certificate, and hands out logged-in client sessions pinned to its fingerprint.

pub mod faultfs;
pub mod garage;
pub mod moto;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use anyhow::{bail, Context};
use bytes::Bytes;
use coffer_client::{Codec, Frame, Need, Session, SessionOptions, Target};
use coffer_proto::v1::{self, Node, NodeKind, Tree};
use coffer_proto::{pack_ids, ChunkId};
use prost::Message as _;

/// Repository password used by every test.
pub const REPO_PASSWORD: &str = "test-repo-password";
/// Password of every test user.
pub const USER_PASSWORD: &str = "test-user-password";

/// Directory holding the workspace's built binaries (`target/<profile>`), found from the running
/// test executable (`target/<profile>/deps/<test>`).
#[must_use]
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps");
    dir.to_path_buf()
}

/// Path of a workspace binary; panics with a hint when it was not built.
#[must_use]
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --release --bins` first (the test script does)",
        p.display()
    );
    p
}

/// A repository and, when started, the appliance serving it.
#[derive(Debug)]
pub struct Appliance {
    pub dir: PathBuf,
    pub repo: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    pub pack_target: Option<u64>,
    child: Option<Child>,
    /// Held open while the appliance runs: when the test process ends, the pipe closes and the
    /// appliance (`--shutdown-on-stdin`) stops by itself.
    stdin: Option<std::process::ChildStdin>,
    pub addr: Option<String>,
    pub fingerprint: Option<String>,
    /// `http://…/metrics` when started with `--metrics-listen`.
    pub metrics_url: Option<String>,
    /// `https://…/` when started with `--ui-listen`, and the built-in administrator's
    /// password with `--random-password`.
    pub ui_url: Option<String>,
    pub server_password: Option<String>,
    /// Everything the appliance wrote to standard error, across starts.
    pub log: PathBuf,
    /// Extra `serve` arguments and environment (e.g. a server control user).
    pub serve_args: Vec<String>,
    pub serve_env: Vec<(String, String)>,
}

fn appliance_cmd() -> Command {
    let mut c = Command::new(bin("coffer-appliance"));
    c.env("COFFER_REPO_PASSWORD", REPO_PASSWORD)
        .env("COFFER_USER_PASSWORD", USER_PASSWORD)
        .env("COFFER_LOG", "info")
        .stdin(Stdio::null());
    c
}

impl Appliance {
    /// Runs a subcommand to completion.
    ///
    /// # Errors
    /// When the binary cannot be started.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(appliance_cmd().args(args).output()?)
    }

    /// `init` a repository in `dir/repo` with `shards` shards and the given average chunk size,
    /// and add the users.
    ///
    /// # Errors
    /// When a command fails.
    pub fn init(dir: &Path, shards: u16, chunk_avg: u32, users: &[&str]) -> anyhow::Result<Self> {
        // Most tests exercise deletion by a snapshot's owner: they use the full defaults of
        // repositories made before append-only defaults (tests of the new default say so).
        Self::init_with(dir, shards, chunk_avg, users, &["--default-access", "full"])
    }

    /// [`Appliance::init`] with more `init` arguments.
    ///
    /// # Errors
    /// When a command fails.
    pub fn init_with(
        dir: &Path,
        shards: u16,
        chunk_avg: u32,
        users: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::init_in(dir, &dir.join("repo"), shards, chunk_avg, users, extra)
    }

    /// [`Appliance::init_with`] with the repository at `repo` (e.g. on a test file system);
    /// certificate, key and log stay in `dir`.
    ///
    /// # Errors
    /// When a command fails.
    pub fn init_in(
        dir: &Path,
        repo: &Path,
        shards: u16,
        chunk_avg: u32,
        users: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let a = Self::existing(dir, repo);
        let repo = a.repo.to_str().context("utf-8 path")?.to_string();
        let shards = shards.to_string();
        let avg = chunk_avg.to_string();
        let out = a.run(
            &[
                "init",
                "--repo",
                &repo,
                "--shards",
                &shards,
                "--chunk-avg",
                &avg,
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .collect::<Vec<_>>(),
        )?;
        if !out.status.success() {
            bail!("init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        for u in users {
            let out = a.run(&["user", "add", u, "--repo", &repo])?;
            if !out.status.success() {
                bail!("user add failed: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        Ok(a)
    }

    /// A repository that exists already at `repo` (made by `attach`, say); certificate, key and
    /// log in `dir`. Not started.
    #[must_use]
    pub fn existing(dir: &Path, repo: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            repo: repo.to_path_buf(),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            pack_target: None,
            child: None,
            stdin: None,
            addr: None,
            fingerprint: None,
            metrics_url: None,
            ui_url: None,
            server_password: None,
            log: dir.join("appliance.log"),
            serve_args: Vec::new(),
            serve_env: Vec::new(),
        }
    }

    /// [`Appliance::init`] then [`Appliance::start`].
    ///
    /// # Errors
    /// As those.
    pub fn started(
        dir: &Path,
        shards: u16,
        chunk_avg: u32,
        users: &[&str],
    ) -> anyhow::Result<Self> {
        let mut a = Self::init(dir, shards, chunk_avg, users)?;
        a.start()?;
        Ok(a)
    }

    /// Repository path as a string.
    #[must_use]
    pub fn repo_str(&self) -> String {
        self.repo.to_string_lossy().into_owned()
    }

    /// Starts `serve`; returns when the appliance printed its fingerprint and address. Any
    /// startup failure is returned with the appliance's own message.
    ///
    /// # Errors
    /// When the appliance exits instead of listening.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let mut c = appliance_cmd();
        c.args([
            "serve",
            "--shutdown-on-stdin",
            "--repo",
            &self.repo_str(),
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-cert-file")
        .arg(&self.cert)
        .arg("--tls-key-file")
        .arg(&self.key);
        if !self.cert.exists() {
            c.arg("--tls-generate-cert");
        }
        if let Some(t) = self.pack_target {
            c.args(["--pack-target", &t.to_string()]);
        }
        c.args(&self.serve_args);
        c.envs(self.serve_env.iter().map(|(k, v)| (k, v)));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        self.stdin = child.stdin.take();
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut fp = None;
        loop {
            let Some(line) = lines.next().transpose()? else {
                let status = child.wait()?;
                bail!(
                    "appliance exited ({status}) before listening: {}",
                    self.log_tail()
                );
            };
            if let Some(u) = line.strip_prefix("METRICS ON: ") {
                self.metrics_url = Some(u.trim().to_string());
            }
            if let Some(u) = line.strip_prefix("UI ON: ") {
                self.ui_url = Some(u.trim().to_string());
            }
            if let Some(p) = line.strip_prefix("SERVER PASSWORD: ") {
                self.server_password = Some(p.trim().to_string());
            }
            if let Some(f) = line.strip_prefix("SERVER CERT SHA256: ") {
                fp = Some(f.trim().to_string());
            }
            if let Some(a) = line.strip_prefix("LISTENING ON: ") {
                self.addr = Some(a.trim().to_string());
                break;
            }
        }
        // Keep draining stdout so the appliance never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        self.fingerprint = fp;
        self.child = Some(child);
        Ok(())
    }

    /// The last lines of the appliance log.
    #[must_use]
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Sets the repository's disclosure mode (`user` or `repository`) with the CLI.
    ///
    /// # Errors
    /// When the command fails.
    pub fn set_disclosure(&self, mode: &str) -> anyhow::Result<()> {
        let out = self.run(&["disclosure", mode, "--repo", &self.repo_str()])?;
        if !out.status.success() {
            bail!(
                "disclosure failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The running appliance's process id.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the appliance process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        self.stdin = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the appliance to exit by itself (a kill point); returns how it ended.
    ///
    /// # Errors
    /// When it was not running or waiting fails.
    pub fn wait(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.stdin = None;
        let mut c = self.child.take().context("the appliance is not running")?;
        Ok(c.wait()?)
    }

    /// SIGTERM and wait; returns the exit code.
    ///
    /// # Errors
    /// When waiting fails.
    pub fn stop(&mut self) -> anyhow::Result<Option<i32>> {
        let Some(mut c) = self.child.take() else {
            return Ok(None);
        };
        let pid = i32::try_from(c.id())?;
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        Ok(c.wait()?.code())
    }

    /// Session options for `identity` against the running appliance.
    ///
    /// # Panics
    /// When the appliance is not running.
    #[must_use]
    pub fn options(&self, identity: &str) -> SessionOptions {
        let url = format!("https://{}", self.addr.as_ref().expect("started"));
        SessionOptions {
            target: Target::parse(&url, self.fingerprint.as_ref().expect("started"))
                .expect("valid target"),
            identity: identity.to_string(),
            password: USER_PASSWORD.to_string(),
            deadlines: coffer_client::Deadlines::default(),
            keyring: None,
        }
    }

    /// A logged-in session.
    ///
    /// # Errors
    /// Connection or login failures.
    pub async fn session(&self, identity: &str) -> anyhow::Result<Session> {
        Ok(Session::connect(&self.options(identity)).await?)
    }

    /// `verify [--read-data]`: (exit code, stdout+stderr).
    ///
    /// # Errors
    /// When the binary cannot be run.
    pub fn verify(&self, read_data: bool) -> anyhow::Result<(i32, String)> {
        let repo = self.repo_str();
        let mut args = vec!["verify", "--repo", &repo];
        if read_data {
            args.push("--read-data");
        }
        let out = self.run(&args)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.code().unwrap_or(-1), text))
    }

    /// Total bytes and number of all pack files (the catalog journal is not counted).
    ///
    /// # Errors
    /// Listing errors.
    pub fn pack_bytes(&self) -> anyhow::Result<(u64, u64)> {
        let mut total = 0;
        let mut n = 0;
        for sub in std::fs::read_dir(self.repo.join("packs"))? {
            let sub = sub?;
            // `packs/catalog/` holds the catalog journal, not packs.
            if sub.file_name() == "catalog" {
                continue;
            }
            for f in std::fs::read_dir(sub.path())? {
                total += f?.metadata()?.len();
                n += 1;
            }
        }
        Ok((total, n))
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Deterministic pseudo-random bytes (xorshift), `compressible` halves of them repeated text.
#[must_use]
pub fn data(seed: u64, len: usize, compressible: bool) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if compressible && (x & 1 == 0) {
            out.extend_from_slice(b"the quick brown fox jumps over the lazy dog ");
        } else {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

/// `coffer connect server` for `user@host` against the running appliance, with `config`.
///
/// # Panics
/// When the appliance is not running or the client fails.
pub fn connect_client(app: &Appliance, config: &Path, user: &str, host: &str) {
    let url = format!("https://{}", app.addr.as_ref().expect("started"));
    connect_url(
        config,
        &url,
        app.fingerprint.as_ref().expect("started"),
        user,
        host,
    );
}

/// `coffer connect server` for `user@host` to `url` pinned to `fingerprint`, with `config`.
///
/// # Panics
/// When the client fails.
pub fn connect_url(config: &Path, url: &str, fingerprint: &str, user: &str, host: &str) {
    let (rc, out, err) = coffer(
        config,
        &[
            "connect",
            "server",
            "--url",
            url,
            "--server-cert-fingerprint",
            fingerprint,
            "--override-username",
            user,
            "--override-hostname",
            host,
        ],
    )
    .expect("coffer runs");
    assert_eq!(rc, 0, "{out}{err}");
}

/// `coffer snapshot create --json SRC`: the summary.
///
/// # Panics
/// When the backup fails.
#[must_use]
pub fn create_snapshot(config: &Path, src: &Path) -> serde_json::Value {
    let (rc, out, err) = coffer(
        config,
        &["snapshot", "create", "--json", src.to_str().expect("utf-8")],
    )
    .expect("coffer runs");
    assert_eq!(rc, 0, "{out}{err}");
    serde_json::from_str(out.lines().last().expect("a summary line")).expect("JSON summary")
}

/// Reads back chunks acknowledged in earlier sessions, given their plaintexts. The repository
/// must be in `repository` disclosure: every chunk must be answered stored (present or "prove"),
/// the session proves it holds each (the appliance checks every proof against the stored data),
/// then reads them; the plaintexts read are returned in order.
///
/// # Errors
/// A chunk that is missing, a refused proof, RPC failures.
pub async fn read_back(s: &Session, plains: &[Bytes]) -> anyhow::Result<Vec<Bytes>> {
    let ids: Vec<coffer_proto::ChunkId> = plains.iter().map(|p| s.chunk_id(p)).collect();
    let needs = s.need(&ids).await?;
    if let Some(i) = needs.iter().position(|n| *n == Need::Missing) {
        bail!("chunk {} is not stored", ids[i]);
    }
    let key = s.possession_key();
    let proofs: Vec<Frame> = ids
        .iter()
        .zip(plains)
        .zip(&needs)
        .filter(|(_, n)| **n == Need::Prove)
        .map(|((id, p), _)| Frame::proof(*id, p, &key))
        .collect();
    if !proofs.is_empty() {
        s.put(proofs, 8 << 20).await?;
    }
    Ok(s.get(&ids).await?)
}

/// The gRPC status code of a client error, if it is one.
#[must_use]
pub fn code(e: &coffer_client::ClientError) -> Option<tonic::Code> {
    match e {
        coffer_client::ClientError::Rpc(s) => Some(s.code()),
        _ => None,
    }
}

/// Restores `snapshot` (an id) to `target` with `config` and asserts it equals `src` bit for bit.
///
/// # Panics
/// When the restore fails or differs.
pub fn assert_restores(config: &Path, snapshot: &str, src: &Path, target: &Path) {
    let (rc, out, err) = coffer(
        config,
        &["restore", snapshot, target.to_str().expect("utf-8")],
    )
    .expect("coffer runs");
    assert_eq!(rc, 0, "{out}{err}");
    assert_eq!(
        describe(src).expect("describe source"),
        describe(target).expect("describe restore")
    );
}

/// Runs `coffer-appliance ARGS --repo <repo>` (through the running appliance's admin socket when
/// it runs); asserts success and returns stdout and stderr.
///
/// # Panics
/// When the command fails.
#[allow(clippy::must_use_candidate)] // mostly run for its effect; the output is there when wanted
pub fn admin(app: &Appliance, args: &[&str]) -> String {
    let repo = app.repo_str();
    let mut full = args.to_vec();
    full.extend(["--repo", &repo]);
    let out = app.run(&full).expect("coffer-appliance runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{args:?}: {text}");
    text
}

/// Adds access rule `user ACCESS target` (`coffer-appliance acl add`); answers the rule's id.
///
/// # Panics
/// When the command fails.
#[allow(clippy::must_use_candidate)] // the id is only wanted to remove the rule again
pub fn acl_add(app: &Appliance, user: &str, access: &str, target: &str) -> String {
    let out = admin(
        app,
        &[
            "acl", "add", "--user", user, "--access", access, "--target", target,
        ],
    );
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Runs the `coffer` client binary with `config` as its configuration; returns
/// (exit code, stdout, stderr).
///
/// # Errors
/// When the binary cannot be started.
pub fn coffer(config: &Path, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = Command::new(bin("coffer"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("COFFER_PASSWORD", USER_PASSWORD)
        .env("XDG_CACHE_HOME", config.with_extension("cache"))
        .env("XDG_STATE_HOME", config.with_extension("state"))
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Describes a tree for bit-exact comparison: relative path -> (kind, mode, mtime, content hash
/// or symlink target, hardlink class). The root itself is not described.
///
/// # Errors
/// I/O errors.
pub fn describe(root: &Path) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut inodes: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
        names.sort_by_key(std::fs::DirEntry::file_name);
        for e in names {
            let p = e.path();
            let rel = p.strip_prefix(root)?.to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p)?;
            let mtime = m.mtime() * 1_000_000_000 + m.mtime_nsec();
            let desc = if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&p)?.display())
            } else if m.is_dir() {
                stack.push(p.clone());
                format!("dir {:o} {mtime}", m.mode() & 0o7777)
            } else {
                let first = inodes.entry(m.ino()).or_insert_with(|| rel.clone()).clone();
                let hash = blake3::hash(&std::fs::read(&p)?);
                format!(
                    "file {:o} {mtime} {} {hash} link-class={first}",
                    m.mode() & 0o7777,
                    m.len()
                )
            };
            out.insert(rel, desc);
        }
    }
    Ok(out)
}

/// Reads a started appliance's stdout until it says where it listens: (listen, fingerprint).
///
/// # Panics
/// When the appliance exits first.
pub fn listening(child: &mut std::process::Child) -> (String, String) {
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let mut fp = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(f) = line.strip_prefix("SERVER CERT SHA256: ") {
            fp = f.trim().to_string();
        }
        if let Some(a) = line.strip_prefix("LISTENING ON: ") {
            std::thread::spawn(move || for _ in lines {});
            return (a.trim().to_string(), fp);
        }
    }
    panic!("the appliance exited before listening");
}

/// SIGTERM and wait: the exit code.
///
/// # Panics
/// When the signal cannot be sent.
#[must_use]
pub fn sigterm(child: &mut std::process::Child) -> Option<i32> {
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    child.wait().unwrap().code()
}

/// A frame of `plain`, uncompressed, under its id.
#[must_use]
pub fn frame(s: &Session, plain: Bytes) -> Frame {
    Frame::new(s.chunk_id(&plain), plain, Codec::None)
}

/// A frame holding a tree object of `nodes`.
#[must_use]
pub fn tree_frame(s: &Session, nodes: Vec<Node>) -> Frame {
    frame(
        s,
        Bytes::from(
            Tree {
                nodes,
                next: Bytes::new(),
            }
            .encode_to_vec(),
        ),
    )
}

/// A snapshot record of path `/probe` with root `root`.
#[must_use]
pub fn snapshot_of(root: ChunkId) -> v1::Snapshot {
    v1::Snapshot {
        path: "/probe".into(),
        root: Bytes::copy_from_slice(root.as_bytes()),
        ..v1::Snapshot::default()
    }
}

/// A node that references `id` in the given way.
#[must_use]
pub fn node_referencing(how: &str, id: ChunkId) -> Node {
    let one = Bytes::from(pack_ids(&[id]));
    let id_bytes = Bytes::copy_from_slice(id.as_bytes());
    let mut n = Node {
        name: Bytes::from_static(b"probe"),
        kind: NodeKind::File.into(),
        mode: 0o644,
        size: 1,
        ..Node::default()
    };
    match how {
        "chunks" => n.chunks = one,
        "chunk_lists" => n.chunk_lists = one,
        "bundle" => n.bundle = id_bytes,
        "subtree" => {
            n.kind = NodeKind::Dir.into();
            n.subtree = id_bytes;
        }
        other => unreachable!("{other}"),
    }
    n
}

/// A field of `/proc/PID/status` in KiB (`VmRSS:`, `VmHWM:`).
///
/// # Panics
/// When the process or field is gone.
#[must_use]
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Sockets the process holds open now (its file descriptors that are sockets).
#[must_use]
pub fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| {
        d.flatten()
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
            })
            .count()
    })
}

/// Polls `cond` every 50 ms until it holds or `limit` passes; returns whether it held. For
/// waiting on what another process does (a connection closing), never as a delay.
pub fn eventually(limit: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `GET /metrics` of an appliance started with `--metrics-listen` (plain HTTP on loopback), with
/// a bearer `token` if given: `(status, body)`.
///
/// # Panics
/// When the appliance has no metrics listener or does not answer HTTP.
#[must_use]
pub fn scrape_metrics(app: &Appliance, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let url = app
        .metrics_url
        .as_ref()
        .expect("started with --metrics-listen");
    let hostport = url
        .strip_prefix("http://")
        .and_then(|u| u.strip_suffix("/metrics"))
        .expect("http://HOST:PORT/metrics");
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {hostport}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}
