//! A real Garage (S3-compatible distributed object store) on 127.0.0.1 for the object-storage
//! tests: one node, a layout of one zone, one bucket and one key. And [`FaultProxy`], a TCP proxy
//! in front of it that answers 503 or stalls on command.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};

/// Where the Garage binary is: `$COFFER_GARAGE`, `garage` on the PATH, or where `.ci/run`
/// installs it.
///
/// # Errors
/// When none is found, saying how to install one.
pub fn garage_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("COFFER_GARAGE") {
        return Ok(PathBuf::from(p));
    }
    for dir in std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
    {
        let p = dir.join("garage");
        if p.is_file() {
            return Ok(p);
        }
    }
    for p in [
        "/var/tmp/coffer-ci-garage/bin/garage",
        "/var/tmp/garage-install/bin/garage",
    ] {
        if Path::new(p).is_file() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!(
        "no Garage binary: `.ci/run` installs it (cargo install --locked garage \
         --no-default-features --features bundled-libs,sqlite --root /var/tmp/coffer-ci-garage), \
         or set COFFER_GARAGE"
    )
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A running single-node Garage with one bucket and a key allowed on it.
#[derive(Debug)]
pub struct Garage {
    child: Child,
    config: PathBuf,
    pub endpoint: String,
    pub s3_port: u16,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
    /// An AWS shared-credentials file with the key.
    pub credentials: PathBuf,
}

impl Garage {
    /// Starts Garage under `dir` and makes bucket `bucket`.
    ///
    /// # Errors
    /// When Garage cannot be found, started or configured.
    pub fn start(dir: &Path, bucket: &str) -> anyhow::Result<Self> {
        // Ports are picked free, then bound by Garage: another test may take one in between.
        let mut last = None;
        for attempt in 0..3 {
            let d = dir.join(format!("try-{attempt}"));
            match Self::start_once(&d, bucket) {
                Ok(g) => return Ok(g),
                Err(e) => {
                    let log = std::fs::read_to_string(d.join("garage.log")).unwrap_or_default();
                    last = Some(e.context(log));
                }
            }
        }
        Err(last.expect("three attempts"))
    }

    fn start_once(dir: &Path, bucket: &str) -> anyhow::Result<Self> {
        let bin = garage_bin()?;
        std::fs::create_dir_all(dir)?;
        let (s3, rpc, admin) = (free_port()?, free_port()?, free_port()?);
        let config = dir.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\n[admin]\n\
                 api_bind_addr = \"127.0.0.1:{admin}\"\n",
                meta = dir.join("meta").display(),
                data = dir.join("data").display(),
                secret = hex::encode(rand::random::<[u8; 32]>()),
            ),
        )?;
        let log = std::fs::File::create(dir.join("garage.log"))?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut g = Self {
            child,
            config,
            endpoint: format!("http://127.0.0.1:{s3}"),
            s3_port: s3,
            bucket: bucket.to_string(),
            key_id: String::new(),
            secret: String::new(),
            credentials: dir.join("credentials"),
        };
        // The node answers its CLI once its RPC is up: polled, bounded.
        let mut id = None;
        for _ in 0..600 {
            if let Ok(out) = g.cli(&["node", "id", "-q"]) {
                id = out
                    .lines()
                    .next()
                    .map(|l| l.split('@').next().unwrap_or(l).to_string());
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let id = id.context("garage did not answer `node id` within 30 s")?;
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &id])?;
        g.cli(&["layout", "apply", "--version", "1"])?;
        g.cli(&["bucket", "create", bucket])?;
        let out = g.cli(&["key", "create", "coffer-test"])?;
        for line in out.lines() {
            if let Some(v) = line.trim().strip_prefix("Key ID:") {
                g.key_id = v.trim().to_string();
            }
            if let Some(v) = line.trim().strip_prefix("Secret key:") {
                g.secret = v.trim().to_string();
            }
        }
        if g.key_id.is_empty() || g.secret.is_empty() {
            bail!("cannot read the key from `garage key create`: {out}");
        }
        g.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", bucket, "--key", &g.key_id,
        ])?;
        std::fs::write(
            &g.credentials,
            format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                g.key_id, g.secret
            ),
        )?;
        Ok(g)
    }

    /// Runs the Garage CLI against this node.
    ///
    /// # Errors
    /// When it fails.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(garage_bin()?)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "garage {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn client(&self) -> anyhow::Result<(tokio::runtime::Runtime, object_store::aws::AmazonS3)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        coffer_appliance::pack::store::s3::install_crypto();
        let store = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_region("garage")
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .build()?;
        Ok((rt, store))
    }

    /// The bytes of object `key`.
    ///
    /// # Errors
    /// When it cannot be read.
    pub fn read(&self, key: &str) -> anyhow::Result<Vec<u8>> {
        use object_store::ObjectStoreExt;
        let (rt, store) = self.client()?;
        rt.block_on(async {
            let r = store.get(&object_store::path::Path::from(key)).await?;
            Ok(r.bytes().await?.to_vec())
        })
    }

    /// Deletes object `key` (an operator declaring a dead appliance's lease void).
    ///
    /// # Errors
    /// When the store refuses.
    pub fn delete(&self, key: &str) -> anyhow::Result<()> {
        use object_store::ObjectStoreExt;
        let (rt, store) = self.client()?;
        rt.block_on(store.delete(&object_store::path::Path::from(key)))?;
        Ok(())
    }

    /// Every object in the bucket under `prefix`, with its size.
    ///
    /// # Errors
    /// When the listing fails.
    pub fn objects(&self, prefix: &str) -> anyhow::Result<Vec<(String, u64)>> {
        let (rt, store) = self.client()?;
        rt.block_on(async {
            use futures::StreamExt;
            use object_store::ObjectStore;
            let p = object_store::path::Path::from(prefix);
            let mut s = store.list(Some(&p));
            let mut out = Vec::new();
            while let Some(m) = s.next().await {
                let m = m?;
                out.push((m.location.to_string(), m.size));
            }
            Ok(out)
        })
    }

    /// The `init --storage` arguments for prefix `prefix` through `endpoint` (Garage's own, or
    /// a fault proxy's).
    #[must_use]
    pub fn storage_args(&self, prefix: &str, endpoint: &str) -> Vec<String> {
        vec![
            "--storage".into(),
            format!("s3://{}/{prefix}", self.bucket),
            "--s3-endpoint".into(),
            endpoint.into(),
            "--s3-region".into(),
            "garage".into(),
            "--s3-credentials-file".into(),
            self.credentials.display().to_string(),
        ]
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the proxy does with a new connection.
pub const PASS: u8 = 0;
/// Answers `503 Slow Down` to the request and closes.
pub const FAIL: u8 = 1;
/// Reads the request and never answers (the client's timeout fires).
pub const STALL: u8 = 2;

/// A TCP proxy in front of the object store: passes bytes through, or injects failures. A mode
/// change drops every open connection, so that pooled connections meet the new mode too.
#[derive(Debug)]
pub struct FaultProxy {
    pub endpoint: String,
    mode: Arc<AtomicU8>,
    /// Connections answered 503 or stalled so far.
    injected: Arc<AtomicU64>,
    conns: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 and forwards to `to`.
    ///
    /// # Errors
    /// When it cannot listen.
    pub fn start(to: SocketAddr) -> anyhow::Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let endpoint = format!("http://{}", l.local_addr()?);
        let mode = Arc::new(AtomicU8::new(PASS));
        let injected = Arc::new(AtomicU64::new(0));
        let conns: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (m, inj, cs) = (mode.clone(), injected.clone(), conns.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                if let Ok(k) = c.try_clone() {
                    cs.lock().expect("proxy lock").push(k);
                }
                let mode = m.load(Ordering::SeqCst);
                let inj = inj.clone();
                std::thread::spawn(move || serve(c, to, mode, &inj));
            }
        });
        Ok(Self {
            endpoint,
            mode,
            injected,
            conns,
        })
    }

    /// Sets what happens to new connections; drops the open ones.
    pub fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
        for c in self.conns.lock().expect("proxy lock").drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Connections that met a failure or a stall.
    #[must_use]
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }
}

fn serve(mut c: std::net::TcpStream, to: SocketAddr, mode: u8, injected: &AtomicU64) {
    use std::io::{Read, Write};
    if mode != PASS {
        injected.fetch_add(1, Ordering::SeqCst);
        // Read the request head, then fail or hold it.
        let mut head = Vec::new();
        let mut b = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 1 << 20 {
            match c.read(&mut b) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&b[..n]),
            }
        }
        if mode == FAIL {
            let _ = c.write_all(
                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            return;
        }
        // STALL: keep the connection until the client gives up or the proxy drops it.
        while matches!(c.read(&mut b), Ok(n) if n > 0) {}
        return;
    }
    let Ok(up) = std::net::TcpStream::connect(to) else {
        return;
    };
    let (Ok(mut c2), Ok(mut up2)) = (c.try_clone(), up.try_clone()) else {
        return;
    };
    let mut up = up;
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut up2);
        let _ = up2.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut up, &mut c);
    let _ = c.shutdown(std::net::Shutdown::Both);
    let _ = t.join();
}
