//! `coffer connect server ...` and `coffer disconnect`: the saved client configuration.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use coffer_client::ClientConfig;

#[derive(Subcommand, Debug)]
pub enum ConnectTo {
    /// Connect to a coffer appliance.
    Server {
        /// https://HOST:PORT
        #[arg(long)]
        url: String,
        /// SHA-256 of the appliance certificate (the SERVER CERT SHA256 line it prints).
        #[arg(long)]
        server_cert_fingerprint: String,
        /// Username instead of $USER.
        #[arg(long)]
        override_username: Option<String>,
        /// Hostname instead of this machine's short hostname.
        #[arg(long)]
        override_hostname: Option<String>,
        /// File whose first line is the password (else COFFER_PASSWORD, else a prompt).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// Sealed repositories: this machine's keyring member file (`coffer keyring
        /// add-member`). It is copied beside the configuration (mode 0600).
        #[arg(long, value_name = "FILE", conflicts_with = "token")]
        keyring: Option<PathBuf>,
        /// A one-time enrollment token (`coffer keyring enroll`): creates this machine's account
        /// with a generated password and, on a sealed appliance, brings its keys. No password
        /// or key file is needed.
        #[arg(long, conflicts_with_all = ["password_file", "keyring"])]
        token: Option<String>,
    },
}

fn short_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_else(|_| "localhost".into())
        .trim()
        .split('.')
        .next()
        .unwrap_or("localhost")
        .to_ascii_lowercase()
}

/// Logs in once to check the settings, then saves them at `cfg_path`.
pub async fn connect(to: ConnectTo, cfg_path: &Path) -> anyhow::Result<()> {
    let ConnectTo::Server {
        url,
        server_cert_fingerprint,
        override_username,
        override_hostname,
        password_file,
        keyring,
        token,
    } = to;
    let user = override_username
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "root".into());
    let host = override_hostname.unwrap_or_else(short_hostname);
    let identity = format!("{user}@{host}").to_ascii_lowercase();
    if let Some(token) = token {
        let target = coffer_client::Target::parse(&url, &server_cert_fingerprint)?;
        let e = coffer_client::redeem_enrollment(&target, &identity, &token).await?;
        let kept = cfg_path.with_file_name("keyring.json");
        if let Some(text) = &e.member_file {
            coffer_client::save_private(&kept, text)?;
        }
        let cfg = ClientConfig {
            url,
            fingerprint: server_cert_fingerprint,
            identity: e.identity,
            password: e.password,
            keyring: e.member_file.is_some().then_some(kept),
        };
        cfg.save(cfg_path)?;
        let s = super::session(&cfg).await?;
        s.end().await;
        println!(
            "enrolled at {} as {}{} (configuration saved to {})",
            cfg.url,
            s.hello.identity,
            if cfg.keyring.is_some() {
                " with its keyring member file"
            } else {
                ""
            },
            cfg_path.display()
        );
        return Ok(());
    }
    let password = match password_file {
        Some(f) => std::fs::read_to_string(&f)
            .with_context(|| f.display().to_string())?
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
        None => match std::env::var("COFFER_PASSWORD") {
            Ok(p) => p,
            Err(_) => rpassword::prompt_password(format!("Password for {identity}: "))?,
        },
    };
    // The member file is checked (certificate, account) before anything is saved.
    let member = match &keyring {
        Some(f) => {
            let m = coffer_client::Member::load(f)?;
            if m.member != identity {
                anyhow::bail!(
                    "{} is the member file of {}, not of {identity}",
                    f.display(),
                    m.member
                );
            }
            Some(std::fs::read_to_string(f)?)
        }
        None => None,
    };
    let kept = cfg_path.with_file_name("keyring.json");
    let mut cfg = ClientConfig {
        url,
        fingerprint: server_cert_fingerprint,
        identity,
        password,
        keyring,
    };
    let s = super::session(&cfg).await?;
    s.end().await;
    if let Some(text) = member {
        coffer_client::save_private(&kept, &text)?;
        cfg.keyring = Some(kept);
    }
    cfg.save(cfg_path)?;
    println!(
        "connected to {} as {} (configuration saved to {})",
        cfg.url,
        s.hello.identity,
        cfg_path.display()
    );
    Ok(())
}

/// Removes the configuration at `cfg_path`.
pub fn disconnect(cfg_path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(cfg_path) {
        Ok(()) => println!("removed {}", cfg_path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => println!("not connected"),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
