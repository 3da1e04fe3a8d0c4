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
    } = to;
    let user = override_username
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "root".into());
    let host = override_hostname.unwrap_or_else(short_hostname);
    let identity = format!("{user}@{host}").to_ascii_lowercase();
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
    let cfg = ClientConfig {
        url,
        fingerprint: server_cert_fingerprint,
        identity,
        password,
    };
    let s = super::session(&cfg).await?;
    s.end().await;
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
