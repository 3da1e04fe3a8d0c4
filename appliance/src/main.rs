//! `coffer-appliance`: command-line entry point.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use coffer_appliance::access::{self, accounts as auth, admin, rules as acl};
use coffer_appliance::catalog::{Catalog, UserRecord};
use coffer_appliance::crypto::keys::{KdfParams, MasterKey};
use coffer_appliance::index::{ChunkIndex, OpenMode, RocksIndex};
use coffer_appliance::net::{server, tls};
use coffer_appliance::repo::{ChunkerParams, Mode, RepoConfig, RepoPaths, Sharding};
use coffer_appliance::{maintenance, pack};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "coffer-appliance",
    version,
    about = "The coffer deduplicating backup appliance"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug)]
struct RepoArg {
    /// Repository directory.
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
}

#[derive(clap::Args, Debug)]
struct RepoPassword {
    /// File whose first line is the repository password (else COFFER_REPO_PASSWORD, else a prompt).
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a new repository.
    Init {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        password: RepoPassword,
        /// Number of shards (one per core when serving). Default: the CPUs available now.
        #[arg(long)]
        shards: Option<u16>,
        /// FastCDC average chunk size in bytes (min = avg/4, max = avg*4).
        #[arg(long, default_value_t = ChunkerParams::DEFAULT.avg)]
        chunk_avg: u32,
    },
    /// Serve the repository over gRPC + TLS until SIGTERM/SIGINT.
    Serve {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        password: RepoPassword,
        /// Where to listen: HOST:PORT (port 0 picks a free port; the chosen one is printed) or
        /// unix:/path/to/socket. Ignored when systemd passes a socket (LISTEN_FDS).
        #[arg(long, default_value = "127.0.0.1:5151")]
        listen: String,
        /// Permissions of a unix:/… listening socket, in octal.
        #[arg(long, default_value = "660", value_parser = parse_mode)]
        listen_mode: u32,
        /// Seconds a new connection has to complete its TLS handshake before it is closed.
        #[arg(long, default_value_t = 10, value_name = "SECS")]
        handshake_timeout: u64,
        /// Free bytes to keep on the packs' file system for the index and catalog: backups are
        /// refused (RESOURCE_EXHAUSTED) rather than fill it. Default: 2 % of the file system,
        /// between 8 MiB and 1 GiB; 0 when the index lives on another disk.
        #[arg(long, value_name = "BYTES")]
        space_reserve: Option<u64>,
        /// Create a self-signed certificate at --tls-cert-file/--tls-key-file (never overwrites).
        #[arg(long)]
        tls_generate_cert: bool,
        /// PEM certificate file.
        #[arg(long, value_name = "FILE")]
        tls_cert_file: PathBuf,
        /// PEM private key file.
        #[arg(long, value_name = "FILE")]
        tls_key_file: PathBuf,
        /// Host names to put in a generated certificate.
        #[arg(long, value_delimiter = ',', default_value = "localhost")]
        tls_names: Vec<String>,
        /// Shut down gracefully when standard input is closed.
        #[arg(long)]
        shutdown_on_stdin: bool,
        /// Pack size target in bytes (default from the tuning plan).
        #[arg(long, hide = true)]
        pack_target: Option<u64>,
        /// Identity (`name@host`) of the server control user, who may only call Refresh and
        /// ServerStatus; its password comes from COFFER_SERVER_CONTROL_PASSWORD.
        #[arg(long, value_name = "NAME@HOST")]
        server_control_username: Option<String>,
    },
    /// Manage accounts (through the running appliance if there is one: effective at once).
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Manage access rules (through the running appliance if there is one: effective at once).
    Acl {
        #[command(subcommand)]
        cmd: AclCmd,
    },
    /// Show or set what FindMissing reveals about chunks stored by others: `user` (default: no
    /// existence oracle; the client uploads data it has not referenced before and nothing new is
    /// stored) or `repository` (saves that upload, reveals that someone stored the data).
    Disclosure {
        #[command(flatten)]
        repo: RepoArg,
        /// `user` or `repository`; omit to show the current mode.
        mode: Option<String>,
    },
    /// Make the running appliance reload accounts and rules from its catalog (as SIGHUP does).
    Refresh {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Check invariants I1 (with --read-data), I2 and I5; exit 1 on any error.
    Verify {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        password: RepoPassword,
        /// Decrypt every chunk and check that it hashes to its id.
        #[arg(long)]
        read_data: bool,
    },
    /// Rebuild the whole index from pack files (the old index, if any, is moved aside).
    RebuildIndex {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        password: RepoPassword,
    },
    /// Print the hardware found, the plan `serve` would apply (which core runs which shard,
    /// network threads, queue depth, pack size, index cache) and what to change, with reasons.
    Tune {
        /// Shards to plan for (default: the repository's with --repo, else all CPUs).
        #[arg(long)]
        shards: Option<usize>,
        /// Repository to plan for (its shard count and the disks under it).
        #[arg(long, value_name = "DIR")]
        repo: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    /// Add an account `username@hostname`.
    Add {
        /// `username@hostname`.
        identity: String,
        #[command(flatten)]
        repo: RepoArg,
        /// File whose first line is the password (else COFFER_USER_PASSWORD, else a prompt).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// List accounts (never shows secrets).
    List {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Change an account's password (ends its sessions).
    Set {
        /// `username@hostname`.
        identity: String,
        #[command(flatten)]
        repo: RepoArg,
        /// File whose first line is the new password (else COFFER_USER_PASSWORD, else a prompt).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Delete an account (ends its sessions; its snapshots stay).
    Delete {
        /// `username@hostname`.
        identity: String,
        #[command(flatten)]
        repo: RepoArg,
    },
}

#[derive(Subcommand, Debug)]
enum AclCmd {
    /// Store the built-in default rules explicitly, so that rules can be added and removed.
    Enable {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// List the rules in force.
    List {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Add a rule, e.g. `--user 'auditor@*' --access READ --target type=snapshot,hostname=db1`.
    Add {
        #[command(flatten)]
        repo: RepoArg,
        /// `user@host` pattern; either side may be `*`.
        #[arg(long)]
        user: String,
        /// READ, APPEND or FULL.
        #[arg(long)]
        access: String,
        /// `type=snapshot|policy|user|acl` and labels (username, hostname, path, policyType);
        /// values may be OWN_USER / OWN_HOST.
        #[arg(long)]
        target: String,
    },
    /// Remove rules: shows what would be removed; acts only with --delete.
    Remove {
        #[command(flatten)]
        repo: RepoArg,
        /// Rule ids (see `acl list`).
        ids: Vec<String>,
        /// Every stored rule (the built-in defaults then apply again).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Really remove them.
        #[arg(long)]
        delete: bool,
    },
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode like 660"))
}

/// Runs an administrative request through the running appliance or on the catalog.
fn admin_run(repo: &Path, req: &admin::Request) -> anyhow::Result<admin::Reply> {
    let paths = RepoPaths::new(repo);
    paths.load_config()?;
    let (reply, live) = admin::run(&paths.admin_socket(), &paths.catalog(), req)?;
    if !matches!(
        req,
        admin::Request::UserList
            | admin::Request::AclList
            | admin::Request::Disclosure { mode: None }
    ) {
        if live {
            eprintln!("applied by the running appliance (in force now)");
        } else {
            eprintln!("written to the catalog (the appliance reads it when it starts)");
        }
    }
    Ok(reply)
}

fn new_user(identity: &str, password_file: Option<&Path>) -> anyhow::Result<UserRecord> {
    let identity = auth::normalise_identity(identity)?;
    let pw = read_secret(password_file, "COFFER_USER_PASSWORD", "Password: ", true)?;
    if pw.chars().count() < auth::MIN_PASSWORD_CHARS {
        bail!(
            "passwords must be at least {} characters",
            auth::MIN_PASSWORD_CHARS
        );
    }
    Ok(UserRecord {
        identity,
        password_hash: auth::hash_password(&pw)?,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            .cast_signed(),
        owner: Some(hex::encode(rand::random::<[u8; 16]>())),
    })
}

fn read_secret(
    file: Option<&Path>,
    env: &str,
    prompt: &str,
    confirm: bool,
) -> anyhow::Result<String> {
    if let Some(f) = file {
        let s = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        return Ok(s.lines().next().unwrap_or_default().to_string());
    }
    if let Ok(s) = std::env::var(env) {
        return Ok(s);
    }
    let p = rpassword::prompt_password(prompt).with_context(|| {
        format!("no terminal to ask for the password on: use --password-file or {env}")
    })?;
    if confirm && rpassword::prompt_password("Repeat: ")? != p {
        bail!("the passwords do not match");
    }
    Ok(p)
}

fn repo_password(p: &RepoPassword, confirm: bool) -> anyhow::Result<String> {
    let pw = read_secret(
        p.password_file.as_deref(),
        "COFFER_REPO_PASSWORD",
        "Repository password: ",
        confirm,
    )?;
    if pw.is_empty() {
        bail!("the repository password must not be empty");
    }
    Ok(pw)
}

fn unlock(paths: &RepoPaths, p: &RepoPassword) -> anyhow::Result<MasterKey> {
    paths.load_config()?;
    Ok(MasterKey::load(
        &paths.master_key(),
        repo_password(p, false)?.as_bytes(),
    )?)
}

fn init(
    paths: &RepoPaths,
    password: &RepoPassword,
    shards: Option<u16>,
    avg: u32,
) -> anyhow::Result<()> {
    if paths.config().exists() {
        return Err(coffer_appliance::RepoError::AlreadyExists(paths.root.clone()).into());
    }
    let chunker = ChunkerParams {
        min: (avg / 4).max(64),
        avg,
        max: avg.saturating_mul(4),
    };
    chunker.validate()?;
    let shards = match shards {
        Some(0) => bail!("--shards must be at least 1"),
        Some(n) => n,
        None => u16::try_from(coffer_tuning::Hardware::detect().cpus.len()).unwrap_or(u16::MAX),
    };
    let pw = repo_password(password, true)?;
    std::fs::create_dir_all(&paths.root)?;
    // Private to the appliance's user even when the directory existed before.
    std::fs::set_permissions(&paths.root, std::fs::Permissions::from_mode(0o700))?;
    let cfg = RepoConfig {
        id: rand::random(),
        mode: Mode::Managed,
        sharding: Sharding::Le64Mod,
        shards,
        chunker,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            .cast_signed(),
    };
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(paths.keys())?;
    std::fs::create_dir_all(paths.packs())?;
    let key = MasterKey::generate().wrap(pw.as_bytes(), KdfParams::DEFAULT)?;
    std::fs::write(paths.master_key(), key)?;
    std::fs::set_permissions(paths.master_key(), std::fs::Permissions::from_mode(0o600))?;
    for s in 0..shards {
        RocksIndex::open(&paths.shard_index(s), OpenMode::Create, 8 << 20)?;
    }
    Catalog::open(&paths.catalog(), true)?;
    // The repository file is written last: its presence means the repository is complete.
    let tmp = paths.root.join("coffer.repo.tmp");
    std::fs::write(&tmp, cfg.encode())?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, paths.config())?;
    std::fs::File::open(&paths.root)?.sync_all()?;
    println!(
        "created repository {} in {} ({} shards, chunks {}..{}..{} bytes)",
        hex::encode(cfg.id),
        paths.root.display(),
        shards,
        chunker.min,
        chunker.avg,
        chunker.max
    );
    Ok(())
}

fn rebuild_index(paths: &RepoPaths, password: &RepoPassword) -> anyhow::Result<()> {
    let cfg = paths.load_config()?;
    let master = unlock(paths, password)?;
    let tmp = paths.root.join("index.rebuild");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let indexes: Vec<RocksIndex> = (0..cfg.shards)
        .map(|s| RocksIndex::open(&tmp.join(format!("shard-{s}")), OpenMode::Create, 64 << 20))
        .collect::<Result<_, _>>()?;
    let refs: Vec<&dyn ChunkIndex> = indexes.iter().map(|i| i as &dyn ChunkIndex).collect();
    let stats = pack::recover::rebuild(paths, &master, &refs)
        .map_err(|e| anyhow::anyhow!("rebuild aborted: {e}"))?;
    drop(refs);
    drop(indexes);
    if paths.index().exists() {
        let aside = paths.root.join(format!(
            "index.old-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
        ));
        std::fs::rename(paths.index(), &aside)?;
        println!("moved the previous index aside to {}", aside.display());
    }
    std::fs::rename(&tmp, paths.index())?;
    println!(
        "rebuilt the index from {} packs: {} chunks ({} unsealed packs sealed, {} torn packs \
         set aside as <id>.torn)",
        stats.packs, stats.chunks, stats.unsealed_packs_sealed, stats.set_aside
    );
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Init {
            repo,
            password,
            shards,
            chunk_avg,
        } => {
            init(&RepoPaths::new(&repo.repo), &password, shards, chunk_avg)?;
        }
        Cmd::Serve {
            repo,
            password,
            listen,
            tls_generate_cert,
            tls_cert_file,
            tls_key_file,
            tls_names,
            pack_target,
            shutdown_on_stdin,
            server_control_username,
            listen_mode,
            handshake_timeout,
            space_reserve,
        } => {
            let paths = RepoPaths::new(&repo.repo);
            let master = unlock(&paths, &password)?;
            let control = match server_control_username {
                None => None,
                Some(name) => {
                    let identity = auth::normalise_identity(&name)?;
                    let pw = std::env::var("COFFER_SERVER_CONTROL_PASSWORD").map_err(|_| {
                        anyhow::anyhow!(
                            "--server-control-username needs COFFER_SERVER_CONTROL_PASSWORD"
                        )
                    })?;
                    if pw.chars().count() < auth::MIN_PASSWORD_CHARS {
                        bail!(
                            "COFFER_SERVER_CONTROL_PASSWORD must be at least {} characters",
                            auth::MIN_PASSWORD_CHARS
                        );
                    }
                    Some(access::ControlUser {
                        identity,
                        phc: auth::hash_password(&pw)?,
                    })
                }
            };
            let tls = if tls_generate_cert {
                tls::generate(&tls_cert_file, &tls_key_file, tls_names)
            } else {
                tls::load(&tls_cert_file, &tls_key_file)
            }
            .map_err(|e| anyhow::anyhow!(e))?;
            server::serve(
                &paths,
                master,
                &server::ServeOptions {
                    listen,
                    tls,
                    pack_target,
                    shutdown_on_stdin,
                    control,
                    listen_mode,
                    handshake_timeout: std::time::Duration::from_secs(handshake_timeout.max(1)),
                    space_reserve,
                },
            )?;
        }
        Cmd::User { cmd } => match cmd {
            UserCmd::Add {
                identity,
                repo,
                password_file,
            } => {
                let user = new_user(&identity, password_file.as_deref())?;
                let id = user.identity.clone();
                admin_run(&repo.repo, &admin::Request::UserAdd { user })?;
                println!("added user {id}");
            }
            UserCmd::Set {
                identity,
                repo,
                password_file,
            } => {
                let user = new_user(&identity, password_file.as_deref())?;
                let id = user.identity.clone();
                admin_run(&repo.repo, &admin::Request::UserSet { user })?;
                println!("changed the password of {id}");
            }
            UserCmd::Delete { identity, repo } => {
                let identity = auth::normalise_identity(&identity)?;
                admin_run(
                    &repo.repo,
                    &admin::Request::UserDelete {
                        identity: identity.clone(),
                    },
                )?;
                println!("deleted user {identity}");
            }
            UserCmd::List { repo } => {
                for u in admin_run(&repo.repo, &admin::Request::UserList)?.users {
                    println!("{u}");
                }
            }
        },
        Cmd::Acl { cmd } => match cmd {
            AclCmd::Enable { repo } => {
                admin_run(&repo.repo, &admin::Request::AclEnable)?;
                println!("default rules stored; `acl list` shows them");
            }
            AclCmd::List { repo } => {
                let r = admin_run(&repo.repo, &admin::Request::AclList)?;
                if r.defaults {
                    println!("# no rules stored: these built-in defaults apply");
                }
                for rule in r.rules {
                    println!("{rule}");
                }
            }
            AclCmd::Add {
                repo,
                user,
                access,
                target,
            } => {
                let rule = acl::Rule::new(&user, access.parse()?, acl::Target::parse(&target)?)?;
                println!("{rule}");
                admin_run(&repo.repo, &admin::Request::AclAdd { rule })?;
            }
            AclCmd::Remove {
                repo,
                ids,
                all,
                delete,
            } => {
                let r = admin_run(&repo.repo, &admin::Request::AclList)?;
                if r.defaults {
                    bail!("no rules are stored (the built-in defaults apply); nothing to remove");
                }
                let chosen: Vec<&acl::Rule> = r
                    .rules
                    .iter()
                    .filter(|rule| all || ids.contains(&rule.id))
                    .collect();
                if let Some(unknown) = ids.iter().find(|id| !r.rules.iter().any(|x| &x.id == *id)) {
                    bail!("no rule {unknown} (see `acl list`)");
                }
                if chosen.is_empty() {
                    bail!("name rule ids or --all");
                }
                for rule in &chosen {
                    println!(
                        "{}{rule}",
                        if delete { "removing " } else { "would remove " }
                    );
                }
                if !delete {
                    println!("nothing removed: repeat with --delete to remove these rules");
                    return Ok(ExitCode::SUCCESS);
                }
                let ids = chosen.iter().map(|x| x.id.clone()).collect();
                admin_run(&repo.repo, &admin::Request::AclRemove { ids })?;
            }
        },
        Cmd::Disclosure { repo, mode } => {
            let r = admin_run(&repo.repo, &admin::Request::Disclosure { mode })?;
            println!("disclosure: {}", r.disclosure);
        }
        Cmd::Refresh { repo } => {
            let paths = RepoPaths::new(&repo.repo);
            paths.load_config()?;
            if admin::call_socket(&paths.admin_socket(), &admin::Request::Refresh)?.is_none() {
                bail!(
                    "no appliance is serving {} (nothing to refresh)",
                    repo.repo.display()
                );
            }
            println!("refreshed");
        }
        Cmd::Verify {
            repo,
            password,
            read_data,
        } => {
            let paths = RepoPaths::new(&repo.repo);
            let cfg = paths.load_config()?;
            let master = if read_data {
                Some(unlock(&paths, &password)?)
            } else {
                None
            };
            let rep = maintenance::verify(&paths, &cfg, master.as_ref())
                .map_err(|e| anyhow::anyhow!(e))?;
            for e in &rep.errors {
                eprintln!("error: {e}");
            }
            for w in &rep.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "verify: {} chunks in {} packs checked{}, {} errors, {} warnings",
                rep.chunks,
                rep.packs,
                if read_data {
                    " (data read and hashed)"
                } else {
                    ""
                },
                rep.errors.len(),
                rep.warnings.len()
            );
            if !rep.errors.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
        Cmd::RebuildIndex { repo, password } => {
            rebuild_index(&RepoPaths::new(&repo.repo), &password)?;
        }
        Cmd::Tune { shards, repo, json } => {
            let (hw, repo_shards) = match &repo {
                Some(r) => {
                    let cfg = RepoPaths::new(r).load_config()?;
                    (
                        coffer_tuning::Hardware::detect_for(r),
                        Some(usize::from(cfg.shards)),
                    )
                }
                None => (coffer_tuning::Hardware::detect(), None),
            };
            let n = shards.or(repo_shards).unwrap_or(hw.cpus.len());
            let plan = coffer_tuning::Plan::new(&hw, n)?;
            if json {
                println!("{}", serde_json::json!({ "hardware": hw, "plan": plan }));
            } else {
                println!(
                    "cpus: {:?} ({} physical cores: {:?})\nfeatures: {:?}\nmemlock: {}\n\
                     memory: {} MiB\nio_uring: kernel {}, io_uring_disabled={}\ndisks: {:?}",
                    hw.cpus,
                    hw.cores.len(),
                    hw.cores,
                    hw.features,
                    hw.memlock_bytes,
                    hw.memory_bytes >> 20,
                    hw.io_uring.kernel,
                    hw.io_uring.disabled,
                    hw.disks
                );
                for s in &plan.shards {
                    println!("shard {} -> cpu {}", s.shard, s.cpu);
                }
                println!(
                    "network threads: {} (floating)\nio_uring depth: {}, registered buffers: {} KiB \
                     per shard\npack target: {} MiB\nindex cache: {} MiB per shard",
                    plan.network_threads,
                    plan.ring_depth,
                    plan.io_memory_per_shard >> 10,
                    plan.pack_target_bytes >> 20,
                    plan.index_cache_bytes >> 20
                );
                for a in &plan.advice {
                    println!("advice: {a}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // Everything the appliance creates (catalog, index, packs, keys) is private to its user:
    // RocksDB and plain creates honour the umask.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COFFER_LOG")
                // glommio logs a benign ERROR when it probes a file system for
                // io_uring polled I/O and finds none; it then uses the normal ring.
                .unwrap_or_else(|_| "info,glommio::reactor=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
