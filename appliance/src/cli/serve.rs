//! `serve`: unlock the repository, load or make the TLS identity, run until told to stop.

use std::path::PathBuf;

use anyhow::{bail, Context};
use coffer_appliance::tls;
use coffer_appliance::RepoPaths;

use super::{parse_mode, unlock, RepoArg, RepoPassword};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub repo: RepoArg,
    #[command(flatten)]
    pub password: RepoPassword,
    /// Where to listen: HOST:PORT (port 0 picks a free port; the chosen one is printed) or
    /// unix:/path/to/socket. Ignored when systemd passes a socket (LISTEN_FDS).
    #[arg(long, default_value = "127.0.0.1:5151")]
    pub listen: String,
    /// Permissions of a unix:/… listening socket, in octal.
    #[arg(long, default_value = "660", value_parser = parse_mode)]
    pub listen_mode: u32,
    /// Seconds a new connection has to complete its TLS handshake before it is closed.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub handshake_timeout: u64,
    /// Free bytes to keep on the packs' file system for the index and catalog: backups are
    /// refused (RESOURCE_EXHAUSTED) rather than fill it. Default: 2 % of the file system,
    /// between 8 MiB and 1 GiB; 0 when the index lives on another disk.
    #[arg(long, value_name = "BYTES")]
    pub space_reserve: Option<u64>,
    /// Create a self-signed certificate at --tls-cert-file/--tls-key-file (never overwrites).
    #[arg(long)]
    pub tls_generate_cert: bool,
    /// PEM certificate file.
    #[arg(long, value_name = "FILE")]
    pub tls_cert_file: PathBuf,
    /// PEM private key file.
    #[arg(long, value_name = "FILE")]
    pub tls_key_file: PathBuf,
    /// Host names to put in a generated certificate.
    #[arg(long, value_delimiter = ',', default_value = "localhost")]
    pub tls_names: Vec<String>,
    /// Shut down gracefully when standard input is closed.
    #[arg(long)]
    pub shutdown_on_stdin: bool,
    /// Pack size target in bytes (default from the tuning plan).
    #[arg(long, hide = true)]
    pub pack_target: Option<u64>,
    /// When retention runs: `daily HH:MM` (UTC), an interval (`6h`), or `off` (only
    /// `maintenance run`). Without policies retention keeps everything.
    #[arg(long, default_value = "daily 03:00", value_name = "SCHEDULE")]
    pub maintenance_at: String,
    /// Garbage collection keeps every chunk written within this window before a run starts
    /// (`24h`, `30m`, `0` for none): a backup that uploads today and commits later never loses
    /// a chunk, whatever the clock. Safety does not rest on it (docs/maintenance.md, G6).
    #[arg(long, default_value = "24h", value_name = "DURATION", value_parser = parse_grace)]
    pub gc_grace: i64,
    /// Compact a pack (copy its live records, delete it) when more than this percentage of it
    /// is garbage.
    #[arg(long, default_value_t = 25, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=100))]
    pub compact_above: u8,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Identity (`name@host`) of the server control user, who may only call Refresh and
    /// ServerStatus; its password comes from COFFER_SERVER_CONTROL_PASSWORD.
    #[arg(long, value_name = "NAME@HOST")]
    pub server_control_username: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP: bind it to localhost or a
    /// private network, or require a token). Port 0 picks one, printed as `METRICS ON:`.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// File whose first line is a bearer token every scrape must present
    /// (`Authorization: Bearer …`).
    #[arg(long, value_name = "FILE", requires = "metrics_listen")]
    pub metrics_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub ui: UiArgs,
    #[command(flatten)]
    pub tier: TierArgs,
}

/// How a repository kept in an object store (`init --storage`) is served.
#[derive(clap::Args, Debug)]
pub struct TierArgs {
    /// When a chunk counts as stored: `local` after the fsync of the staged pack (uploaded in
    /// the background, again after a crash), `remote` only once the object store confirmed it
    /// (every group commit becomes its own object).
    #[arg(long, value_enum, default_value = "local")]
    pub ack_after: coffer_appliance::AckAfter,
    /// Bytes of sealed packs that may wait for upload; beyond, backups are refused
    /// (RESOURCE_EXHAUSTED) until uploads catch up. K/M/G/T suffixes.
    #[arg(long, default_value = "8G", value_name = "BYTES", value_parser = parse_size)]
    pub staging_size: u64,
    /// Bytes of uploaded packs kept on the local disk for reads (least recently read leave
    /// first). K/M/G/T suffixes.
    #[arg(long, default_value = "16G", value_name = "BYTES", value_parser = parse_size)]
    pub cache_size: u64,
    /// Seconds one object-store request may take before it is retried.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub s3_timeout: u64,
    /// Seconds of retries (with backoff, on 5xx, throttling, timeouts and resets) before an
    /// object-store call fails; a staged upload is then tried again later.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub s3_retry_for: u64,
}

fn parse_size(s: &str) -> Result<u64, String> {
    match super::accounts::parse_quota(s) {
        Ok(Some(n)) => Ok(n),
        Ok(None) => Err("a size is needed here".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The web UI.
#[derive(Debug, clap::Args)]
pub struct UiArgs {
    /// Serve the web UI over HTTPS (the same certificate as gRPC) on --ui-listen, by default
    /// 127.0.0.1:8443. Printed as `UI ON: https://…/`.
    #[arg(long)]
    pub ui: bool,
    /// Where the web UI listens (`HOST:PORT`; port 0 picks one). Implies --ui.
    #[arg(long, value_name = "ADDR")]
    pub ui_listen: Option<String>,
    /// Print a generated password for a built-in local administrator of the web UI
    /// (`SERVER PASSWORD: …`, user `admin`), for a single-machine setup. Lasts until the
    /// appliance stops.
    #[arg(long)]
    pub random_password: bool,
}

/// Resource limits; each default comes from the tuning plan (`coffer-appliance tune` prints
/// them). A limit hit answers RESOURCE_EXHAUSTED naming it.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Resource limits (defaults from `coffer-appliance tune`)")]
pub struct LimitArgs {
    /// Connections held at once; past it a new connection closes the longest-idle one, or is
    /// refused while all are busy.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: Option<u64>,
    /// Calls (HTTP/2 streams) open at once on one connection.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: Option<u32>,
    /// Streaming calls one account has open at once, over all its connections.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_streams_per_account: Option<u64>,
    /// Messages one request stream may carry.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_stream_messages: Option<u64>,
    /// A connection with no call in progress for this long is closed (`300s`, `5m`).
    #[arg(long, value_name = "DURATION", value_parser = positive_secs)]
    pub idle_timeout: Option<u64>,
    /// A request stream that sends no message for this long is ended.
    #[arg(long, value_name = "DURATION", value_parser = positive_secs)]
    pub stream_idle_timeout: Option<u64>,
    /// How long a request waits for a read or upload budget that makes no progress before it
    /// is refused.
    #[arg(long, value_name = "DURATION", value_parser = positive_secs)]
    pub admission_wait: Option<u64>,
    /// Chunk data read from packs and not yet sent, appliance-wide, in MiB (each account may
    /// hold 256 MiB of it): `GetChunks` answers are admitted against it before they are read.
    /// At least 256.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(256..))]
    pub read_budget_mib: Option<u64>,
    /// Upload data received and not yet stored, per account, in MiB.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(16..))]
    pub upload_budget_mib: Option<u64>,
    /// Upload data queued at one shard, in MiB.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(16..))]
    pub shard_queue_mib: Option<u64>,
    /// Chunk ids one session may hold (each costs memory until it ends); past it the client is
    /// told to commit and log in again.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub session_chunks: Option<u64>,
}

impl LimitArgs {
    fn flags(&self) -> coffer_appliance::LimitFlags {
        let mib = |m: Option<u64>| m.map(|m| m.saturating_mul(1 << 20));
        let size = |n: Option<u64>| n.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        coffer_appliance::LimitFlags {
            connections: size(self.max_connections),
            streams_per_connection: self.max_streams_per_connection,
            streams_per_account: size(self.max_streams_per_account),
            messages_per_stream: self.max_stream_messages,
            idle_secs: self.idle_timeout,
            stream_idle_secs: self.stream_idle_timeout,
            read_budget_bytes: mib(self.read_budget_mib),
            upload_bytes_per_account: mib(self.upload_budget_mib),
            shard_queue_bytes: mib(self.shard_queue_mib),
            session_chunks: self.session_chunks,
            admission_wait_secs: self.admission_wait,
        }
    }
}

/// A duration of at least one second, in seconds.
fn positive_secs(s: &str) -> Result<u64, String> {
    match coffer_proto::when::parse_duration_secs(s)? {
        0 => Err(format!("{s:?}: must be at least 1s")),
        n => Ok(n),
    }
}

/// `0`, or a number followed by `s`, `m`, `h` or `d`, as microseconds.
fn parse_grace(s: &str) -> Result<i64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    let bad = || format!("{s:?}: expected `0` or a duration like `90s`, `30m`, `24h`, `7d`");
    let t = s.trim();
    let unit = t.chars().last().ok_or_else(bad)?;
    let n: i64 = t[..t.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
    let secs = match unit {
        's' => Some(n),
        'm' => n.checked_mul(60),
        'h' => n.checked_mul(3600),
        'd' => n.checked_mul(86_400),
        _ => None,
    }
    .filter(|v| (0..=3660 * 86_400).contains(v))
    .ok_or_else(bad)?;
    Ok(secs * 1_000_000)
}

/// The server control account, from its flag and COFFER_SERVER_CONTROL_PASSWORD.
fn control_user(name: Option<&str>) -> anyhow::Result<Option<coffer_appliance::ControlUser>> {
    let Some(name) = name else {
        return Ok(None);
    };
    let identity = coffer_appliance::normalise_identity(name)?;
    let pw = std::env::var("COFFER_SERVER_CONTROL_PASSWORD").map_err(|_| {
        anyhow::anyhow!("--server-control-username needs COFFER_SERVER_CONTROL_PASSWORD")
    })?;
    if pw.chars().count() < coffer_appliance::MIN_PASSWORD_CHARS {
        bail!(
            "COFFER_SERVER_CONTROL_PASSWORD must be at least {} characters",
            coffer_appliance::MIN_PASSWORD_CHARS
        );
    }
    Ok(Some(coffer_appliance::ControlUser {
        identity,
        phc: coffer_appliance::hash_password(&pw)?,
    }))
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let paths = RepoPaths::new(&a.repo.repo);
    let master = unlock(&paths, &a.password)?;
    let control = control_user(a.server_control_username.as_deref())?;
    let tls = if a.tls_generate_cert {
        tls::generate(&a.tls_cert_file, &a.tls_key_file, a.tls_names)
    } else {
        tls::load(&a.tls_cert_file, &a.tls_key_file)
    }?;
    let metrics_token = match &a.metrics_token_file {
        Some(f) => {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("reading --metrics-token-file {}", f.display()))?;
            let t = t.lines().next().unwrap_or("").trim().to_owned();
            if t.len() < 16 {
                bail!(
                    "the metrics token in {} is shorter than 16 characters",
                    f.display()
                );
            }
            Some(t)
        }
        None => None,
    };
    let ui_listen = match (a.ui.ui, a.ui.ui_listen) {
        (_, Some(addr)) => Some(addr),
        (true, None) => Some("127.0.0.1:8443".to_string()),
        (false, None) => None,
    };
    if a.ui.random_password && ui_listen.is_none() {
        bail!("--random-password is for the web UI: add --ui or --ui-listen ADDR");
    }
    let ui_password = a.ui.random_password.then(|| {
        let p = hex::encode(rand::random::<[u8; 16]>());
        println!("SERVER PASSWORD: {p}");
        p
    });
    coffer_appliance::serve(
        &paths,
        master,
        &coffer_appliance::ServeOptions {
            listen: a.listen,
            tls,
            pack_target: a.pack_target,
            shutdown_on_stdin: a.shutdown_on_stdin,
            control,
            listen_mode: a.listen_mode,
            handshake_timeout: std::time::Duration::from_secs(a.handshake_timeout.max(1)),
            space_reserve: a.space_reserve,
            limits: a.limits.flags(),
            metrics_listen: a.metrics_listen,
            metrics_token,
            ui_listen,
            ui_password,
            tier: coffer_appliance::TierOptions {
                ack_after: a.tier.ack_after,
                staging_bytes: a.tier.staging_size,
                cache_bytes: a.tier.cache_size,
                timeouts: coffer_appliance::pack::store::s3::Timeouts {
                    request: std::time::Duration::from_secs(a.tier.s3_timeout.max(1)),
                    retries: 32,
                    retry_for: std::time::Duration::from_secs(a.tier.s3_retry_for),
                },
            },
            maintenance: match a.maintenance_at.as_str() {
                "off" => None,
                s => Some(coffer_appliance::Schedule::parse(s)?),
            },
            gc: coffer_appliance::GcConfig {
                grace_us: a.gc_grace,
                compact_above: f64::from(a.compact_above) / 100.0,
            },
        },
    )?;
    Ok(())
}
