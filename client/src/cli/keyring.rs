//! `coffer keyring create|add-member|rotate|show`: the keys of a sealed repository, on an admin
//! machine. The master file never goes to the appliance nor to fleet machines; each fleet
//! machine gets the member file of its role (`connect server --keyring FILE`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use coffer_client::{Kdf, Master, Member, Role};

#[derive(Subcommand, Debug)]
pub enum KeyringCmd {
    /// Create a keyring: a new master secret, written to OUT wrapped under a passphrase
    /// (from --passphrase-file, else COFFER_KEYRING_PASSPHRASE, else a prompt). Keep the file
    /// and the passphrase offline: whoever holds both reads every snapshot of the keyring.
    Create {
        #[arg(long, value_name = "OUT")]
        out: PathBuf,
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Issue the member file of one account (`username@hostname`) with a role: `read-write`
    /// (back up, list, restore), `write-only` (back up; can list or read nothing, its own
    /// snapshots included) or `log-only` (list only). Create the account on the appliance with
    /// the same role (`coffer-appliance user add --role`), or hand out an enrollment token.
    AddMember {
        /// The master file.
        #[arg(long)]
        master: PathBuf,
        /// The account, `username@hostname`.
        #[arg(long)]
        member: String,
        #[arg(long, default_value = "read-write", value_parser = ["read-write", "write-only", "log-only"])]
        role: String,
        /// Where to write the member file (mode 0600).
        #[arg(long, value_name = "OUT")]
        out: PathBuf,
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Remove a member: it is marked removed and the keyring rotates, so nothing written from
    /// now on is sealed under keys it holds, and readers issued afterwards refuse snapshots still
    /// sealed under the old keys once they are newer than the removal. Delete its account on the
    /// appliance too (`coffer-appliance user delete`), and issue the other members again.
    RemoveMember {
        #[arg(long)]
        master: PathBuf,
        #[arg(long)]
        member: String,
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Start the next key generation: new data and log key pairs for what is written from now
    /// on (chunk ids stay, so deduplication goes on). Issue every member file again; a member
    /// left out keeps only what it could read before.
    Rotate {
        #[arg(long)]
        master: PathBuf,
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Show a member file's keyring, account, role and generation (never a key).
    Show { member_file: PathBuf },
    /// Create a one-time enrollment token for a new account, through the appliance this client
    /// is connected to (its account needs FULL on users and rules). The machine then runs
    /// `coffer connect server --url … --server-cert-fingerprint … --token TOKEN`: its account is
    /// created with a generated password and, on a sealed appliance, its keys are unwrapped from
    /// the token — nothing else is needed. Print it once; it works once.
    Enroll {
        /// The account to create, `username@hostname`.
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "read-write", value_parser = ["read-write", "write-only", "log-only"])]
        role: String,
        /// How long the token may wait (`30m`, `24h`, `7d`; at most 30 days).
        #[arg(long, default_value = "24h")]
        expires: String,
        /// The keyring master file: needed on a sealed appliance, refused on a managed one.
        #[arg(long)]
        master: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// Your delete passphrase, when your account has one (creating accounts is stepped up).
        #[arg(long, value_name = "FILE")]
        delete_passphrase_file: Option<PathBuf>,
    },
}

fn passphrase(file: Option<&Path>, confirm: bool) -> anyhow::Result<String> {
    let p = match file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| f.display().to_string())?
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
        None => {
            if let Ok(p) = std::env::var("COFFER_KEYRING_PASSPHRASE") {
                p
            } else {
                let p = rpassword::prompt_password("Keyring passphrase: ")?;
                if confirm && rpassword::prompt_password("Again: ")? != p {
                    bail!("the passphrases differ");
                }
                p
            }
        }
    };
    if p.chars().count() < 12 {
        bail!("a keyring passphrase must be at least 12 characters");
    }
    Ok(p)
}

/// Writes `text` to `path` with mode 0600 (`coffer_client::save_private`), never over an
/// existing file unless `replace`.
fn write_private(path: &Path, text: &str, replace: bool) -> anyhow::Result<()> {
    if !replace && path.exists() {
        bail!("{} exists; not overwriting it", path.display());
    }
    Ok(coffer_client::save_private(path, text)?)
}

fn open_master(path: &Path, file: Option<&Path>) -> anyhow::Result<(Master, String)> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let pw = passphrase(file, false)?;
    Ok((Master::from_file(&text, &pw)?, pw))
}

/// `keyring enroll`: a one-time token made through the connected appliance.
async fn enroll(
    cfg_path: &Path,
    user: &str,
    role: &str,
    expires: &str,
    master_path: Option<&Path>,
    passphrase_file: Option<&Path>,
    delete_passphrase_file: Option<&Path>,
) -> anyhow::Result<()> {
    let role = Role::parse(role)?;
    let secs = coffer_proto::when::parse_duration_secs(expires)
        .map_err(|e| anyhow::anyhow!("--expires: {e}"))?;
    let expires_us = coffer_proto::now_us()
        + i64::try_from(secs.saturating_mul(1_000_000)).unwrap_or(i64::MAX / 2);
    let mut master = match master_path {
        Some(p) => Some(open_master(p, passphrase_file)?),
        None => None,
    };
    if let Some((m, _)) = &mut master {
        // Recorded in the registry, so that remove-member knows it.
        m.add_member(&user.to_ascii_lowercase(), role)?;
    }
    let step_up = match delete_passphrase_file {
        Some(f) => std::fs::read_to_string(f)?
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
        None => String::new(),
    };
    let user = user.to_ascii_lowercase();
    let token = super::connected(cfg_path, async |s| {
        Ok(coffer_client::create_enrollment(
            s,
            master.as_ref().map(|(m, _)| m),
            &user,
            role,
            expires_us,
            &step_up,
        )
        .await?)
    })
    .await?;
    if let (Some((m, pw)), Some(path)) = (&master, master_path) {
        write_private(path, &m.to_file(pw, Kdf::DEFAULT)?, true)?;
    }
    eprintln!(
        "one-time token for {user} ({}), valid for {expires}:",
        role.name()
    );
    println!("{token}");
    Ok(())
}

/// `keyring remove-member`.
fn remove_member(
    master: &Path,
    member: &str,
    passphrase_file: Option<&Path>,
) -> anyhow::Result<()> {
    let (mut m, pw) = open_master(master, passphrase_file)?;
    let member = member.to_ascii_lowercase();
    let keep = m.remove_member(&member)?;
    write_private(master, &m.to_file(&pw, Kdf::DEFAULT)?, true)?;
    println!(
        "removed {member}; keyring {} is at generation {}. Delete its account \
         (coffer-appliance user delete {member}) and issue these members again \
         (add-member): until then their new snapshots are refused by readers issued \
         after this",
        hex::encode(m.keyring_id),
        m.generation
    );
    for k in keep {
        println!("  {} ({})", k.member, k.role.name());
    }
    Ok(())
}

pub async fn run(cmd: KeyringCmd, cfg_path: &Path) -> anyhow::Result<()> {
    match cmd {
        KeyringCmd::Enroll {
            user,
            role,
            expires,
            master,
            passphrase_file,
            delete_passphrase_file,
        } => {
            enroll(
                cfg_path,
                &user,
                &role,
                &expires,
                master.as_deref(),
                passphrase_file.as_deref(),
                delete_passphrase_file.as_deref(),
            )
            .await?;
        }
        KeyringCmd::Create {
            out,
            passphrase_file,
        } => {
            let pw = passphrase(passphrase_file.as_deref(), true)?;
            let m = Master::generate();
            write_private(&out, &m.to_file(&pw, Kdf::DEFAULT)?, false)?;
            println!(
                "created keyring {} in {} (keep it and its passphrase offline)",
                hex::encode(m.keyring_id),
                out.display()
            );
        }
        KeyringCmd::AddMember {
            master,
            member,
            role,
            out,
            passphrase_file,
        } => {
            let (mut m, pw) = open_master(&master, passphrase_file.as_deref())?;
            let role = Role::parse(&role)?;
            let member = member.to_ascii_lowercase();
            if !member.contains('@') {
                bail!("--member is an account, username@hostname");
            }
            let issued = m.add_member(&member, role)?;
            write_private(&out, &issued.to_file()?, false)?;
            write_private(&master, &m.to_file(&pw, Kdf::DEFAULT)?, true)?;
            println!(
                "issued {} member {member} of keyring {} (generation {}) in {}",
                role.name(),
                hex::encode(m.keyring_id),
                m.generation,
                out.display()
            );
            if let Some(r) = role.account_role() {
                println!(
                    "create its account with the same role: coffer-appliance user add {member} --role {r}"
                );
            }
        }
        KeyringCmd::RemoveMember {
            master,
            member,
            passphrase_file,
        } => remove_member(&master, &member, passphrase_file.as_deref())?,
        KeyringCmd::Rotate {
            master,
            passphrase_file,
        } => {
            let (mut m, pw) = open_master(&master, passphrase_file.as_deref())?;
            m.rotate();
            write_private(&master, &m.to_file(&pw, Kdf::DEFAULT)?, true)?;
            println!(
                "keyring {} is at generation {}: issue every member file again (add-member)",
                hex::encode(m.keyring_id),
                m.generation
            );
        }
        KeyringCmd::Show { member_file } => {
            let m = Member::load(&member_file)?;
            println!(
                "keyring {}\nmember {}\nrole {}\ngeneration {}",
                hex::encode(m.keyring_id),
                m.member,
                m.role.name(),
                m.generation
            );
        }
    }
    Ok(())
}
