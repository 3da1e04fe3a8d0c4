//! `user`, `acl`, `disclosure` and `refresh`: account and rule administration, through the
//! running appliance's admin socket when it runs (in force at once), else on the catalog.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Subcommand;
use coffer_appliance::admin;
use coffer_appliance::RepoPaths;
use coffer_appliance::UserRecord;

use super::{read_secret, RepoArg};

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Add an account `username@hostname`.
    Add {
        /// `username@hostname`.
        identity: String,
        #[command(flatten)]
        repo: RepoArg,
        /// File whose first line is the password (else COFFER_USER_PASSWORD, else a prompt).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// Restrict the account whatever the rules say: `write-only` (adds snapshots; never
        /// lists, reads or deletes any, its own included) or `log-only` (lists only). Sealed
        /// mode's member roles.
        #[arg(long, value_parser = ["write-only", "log-only"])]
        role: Option<String>,
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
        /// Set the account's quota of stored bytes instead of its password: a number with an
        /// optional K, M, G or T suffix (powers of 1024), or `none` to lift it.
        #[arg(long, value_name = "BYTES", conflicts_with_all = ["delete_passphrase", "no_delete_passphrase"])]
        quota: Option<String>,
        /// Set the account's delete passphrase instead of its password (from
        /// --delete-passphrase-file, else COFFER_DELETE_PASSPHRASE, else a prompt): deleting a
        /// snapshot, removing a protection or lowering retention then needs it every time. It
        /// must differ from the login password, and the client never stores it.
        #[arg(long, conflicts_with = "no_delete_passphrase")]
        delete_passphrase: bool,
        /// File whose first line is the delete passphrase (implies --delete-passphrase).
        #[arg(long, value_name = "FILE")]
        delete_passphrase_file: Option<PathBuf>,
        /// Remove the account's delete passphrase (FULL access alone then suffices to delete).
        #[arg(long)]
        no_delete_passphrase: bool,
    },
    /// Create a one-time enrollment token for a new account (managed repositories; a sealed
    /// repository's tokens carry keys: `coffer keyring enroll` on the keyring's admin machine).
    /// The machine runs `coffer connect server --url … --server-cert-fingerprint … --token
    /// TOKEN`: its account is created with a generated password. Only a hash of the token is
    /// stored; it works once.
    Enroll {
        /// The account to create, `username@hostname`.
        identity: String,
        #[command(flatten)]
        repo: RepoArg,
        /// `write-only` or `log-only` (see `user add --role`).
        #[arg(long, value_parser = ["write-only", "log-only"])]
        role: Option<String>,
        /// How long the token may wait (`30m`, `24h`, `7d`; at most 30 days).
        #[arg(long, default_value = "24h")]
        expires: String,
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
pub enum AclCmd {
    /// Store the built-in default rules explicitly, so that rules can be added and removed.
    /// From then on an empty rule set means no access.
    Enable {
        #[command(flatten)]
        repo: RepoArg,
        /// Make the defaults append-only: users add, list and read their own snapshots but
        /// never delete them (stored built-in rules are narrowed too).
        #[arg(long)]
        append_only_defaults: bool,
        /// Store the built-in defaults again into an enabled, empty rule set.
        #[arg(long)]
        defaults: bool,
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

/// Runs an administrative request through the running appliance or on the catalog.
pub(super) fn admin_run(repo: &Path, req: &admin::Request) -> anyhow::Result<admin::Reply> {
    let paths = RepoPaths::new(repo);
    paths.load_config()?;
    let (reply, live) = admin::run(&paths.admin_socket(), &paths.catalog(), req)?;
    if !matches!(
        req,
        admin::Request::UserList
            | admin::Request::AclList
            | admin::Request::PolicyList
            | admin::Request::PolicyShow { .. }
            | admin::Request::MaintenanceRun { dry_run: true, .. }
            | admin::Request::Usage { .. }
            | admin::Request::Status
            | admin::Request::Disclosure { mode: None }
            | admin::Request::SnapshotList
            | admin::Request::AuditShow { .. }
            | admin::Request::AuditVerify
    ) {
        if live {
            eprintln!("applied by the running appliance (in force now)");
        } else {
            eprintln!("written to the catalog (the appliance reads it when it starts)");
        }
    }
    Ok(reply)
}

/// `none`, or bytes with an optional K/M/G/T suffix (powers of 1024).
pub(super) fn parse_quota(s: &str) -> anyhow::Result<Option<u64>> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("quota {s:?}: expected bytes like 500G, 1048576 or `none`"))?;
    n.checked_mul(mult)
        .map(Some)
        .ok_or_else(|| anyhow::anyhow!("quota {s:?} is too large"))
}

fn new_user(identity: &str, password_file: Option<&Path>) -> anyhow::Result<UserRecord> {
    let identity = coffer_appliance::normalise_identity(identity)?;
    let pw = read_secret(password_file, "COFFER_USER_PASSWORD", "Password: ", true)?;
    if pw.chars().count() < coffer_appliance::MIN_PASSWORD_CHARS {
        bail!(
            "passwords must be at least {} characters",
            coffer_appliance::MIN_PASSWORD_CHARS
        );
    }
    Ok(UserRecord {
        identity,
        password_hash: coffer_appliance::hash_password(&pw)?,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            .cast_signed(),
        owner: Some(hex::encode(rand::random::<[u8; 16]>())),
        quota: None,
        delete_passphrase: None,
        role: None,
    })
}

/// `user add` (`new`) or `user set`: asks for the password and stores its hash.
fn set_password(
    identity: &str,
    repo: &RepoArg,
    password_file: Option<&Path>,
    new: bool,
    role: Option<String>,
) -> anyhow::Result<()> {
    let mut user = new_user(identity, password_file)?;
    user.role = role;
    let id = user.identity.clone();
    if new {
        admin_run(&repo.repo, &admin::Request::UserAdd { user })?;
        println!("added user {id}");
    } else {
        admin_run(&repo.repo, &admin::Request::UserSet { user })?;
        println!("changed the password of {id}");
    }
    Ok(())
}

/// `user enroll`: a token for a managed repository (no keys in it).
fn enroll(
    identity: &str,
    repo: &RepoArg,
    role: Option<String>,
    expires: &str,
) -> anyhow::Result<()> {
    let identity = coffer_appliance::normalise_identity(identity)?;
    let paths = RepoPaths::new(&repo.repo);
    if paths.load_config()?.mode == coffer_appliance::Mode::Sealed {
        bail!(
            "this repository is sealed: its tokens carry the member's keys, which the appliance \
             never holds; create them with `coffer keyring enroll --master …` on the keyring's \
             admin machine"
        );
    }
    let secs = coffer_proto::when::parse_duration_secs(expires)
        .map_err(|e| anyhow::anyhow!("--expires: {e}"))?;
    if secs == 0 || secs > 30 * 86_400 {
        bail!("--expires must be more than 0 and at most 30 days");
    }
    let auth: [u8; 16] = rand::random();
    let record = coffer_appliance::EnrollmentRecord {
        identity: identity.clone(),
        role,
        expires_us: coffer_proto::now_us() + i64::try_from(secs)? * 1_000_000,
        sealed_keys: String::new(),
        created_by: "admin".into(),
    };
    admin_run(
        &repo.repo,
        &admin::Request::EnrollmentAdd {
            auth_hash: hex::encode(blake3::hash(&auth).as_bytes()),
            record,
        },
    )?;
    eprintln!("one-time token for {identity}, valid for {expires}:");
    println!("coffer-enroll-v1:{}", hex::encode(auth));
    Ok(())
}

pub fn user(cmd: UserCmd) -> anyhow::Result<()> {
    match cmd {
        UserCmd::Add {
            identity,
            repo,
            password_file,
            role,
        } => set_password(&identity, &repo, password_file.as_deref(), true, role)?,
        UserCmd::Set {
            identity,
            repo,
            delete_passphrase,
            delete_passphrase_file,
            no_delete_passphrase,
            quota: None,
            ..
        } if delete_passphrase || delete_passphrase_file.is_some() || no_delete_passphrase => {
            let identity = coffer_appliance::normalise_identity(&identity)?;
            let passphrase = if no_delete_passphrase {
                None
            } else {
                Some(read_secret(
                    delete_passphrase_file.as_deref(),
                    "COFFER_DELETE_PASSPHRASE",
                    "Delete passphrase: ",
                    true,
                )?)
            };
            let set = passphrase.is_some();
            admin_run(
                &repo.repo,
                &admin::Request::UserDeletePassphrase {
                    identity: identity.clone(),
                    passphrase,
                },
            )?;
            if set {
                println!("{identity} now needs its delete passphrase to delete, unprotect or lower retention");
            } else {
                println!("{identity} has no delete passphrase now");
            }
        }
        UserCmd::Set {
            identity,
            repo,
            quota: Some(q),
            ..
        } => {
            let identity = coffer_appliance::normalise_identity(&identity)?;
            let quota = parse_quota(&q)?;
            admin_run(
                &repo.repo,
                &admin::Request::UserQuota {
                    identity: identity.clone(),
                    quota,
                },
            )?;
            match quota {
                Some(b) => println!("{identity} may now store {b} bytes"),
                None => println!("{identity} has no quota now"),
            }
        }
        UserCmd::Set {
            identity,
            repo,
            password_file,
            quota: None,
            ..
        } => set_password(&identity, &repo, password_file.as_deref(), false, None)?,
        UserCmd::Enroll {
            identity,
            repo,
            role,
            expires,
        } => enroll(&identity, &repo, role, &expires)?,
        UserCmd::Delete { identity, repo } => {
            let identity = coffer_appliance::normalise_identity(&identity)?;
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
    }
    Ok(())
}

pub fn acl(cmd: AclCmd) -> anyhow::Result<()> {
    match cmd {
        AclCmd::Enable {
            repo,
            append_only_defaults,
            defaults,
        } => {
            admin_run(
                &repo.repo,
                &admin::Request::AclEnable {
                    append_only: append_only_defaults,
                    defaults,
                },
            )?;
            println!("rules stored; `acl list` shows them");
        }
        AclCmd::List { repo } => {
            let r = admin_run(&repo.repo, &admin::Request::AclList)?;
            let kind = if r.default_access == "append" {
                "append-only defaults: users never delete their own snapshots"
            } else {
                "full defaults: users may delete their own snapshots"
            };
            if r.defaults {
                println!("# no rules stored: these built-in defaults apply ({kind})");
            } else if r.rules.is_empty() {
                println!("# rules are enabled and none is stored: nobody has access");
            } else {
                println!("# stored rules; this repository's built-in defaults: {kind}");
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
            let rule = coffer_appliance::Rule::new(
                &user,
                access.parse()?,
                coffer_appliance::Target::parse(&target)?,
            )?;
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
            let chosen: Vec<&coffer_appliance::Rule> = r
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
                return Ok(());
            }
            let ids = chosen.iter().map(|x| x.id.clone()).collect();
            admin_run(&repo.repo, &admin::Request::AclRemove { ids })?;
        }
    }
    Ok(())
}

pub fn disclosure(repo: &Path, mode: Option<String>) -> anyhow::Result<()> {
    let r = admin_run(repo, &admin::Request::Disclosure { mode })?;
    println!("disclosure: {}", r.disclosure);
    Ok(())
}

pub fn refresh(repo: &Path) -> anyhow::Result<()> {
    let paths = RepoPaths::new(repo);
    paths.load_config()?;
    if admin::call_socket(&paths.admin_socket(), &admin::Request::Refresh)?.is_none() {
        bail!(
            "no appliance is serving {} (nothing to refresh)",
            repo.display()
        );
    }
    println!("refreshed");
    Ok(())
}
