//! moto's S3 server on 127.0.0.1, for what Garage lacks: S3 Object Lock. moto is a mock (it
//! keeps objects in memory and checks no signature), so it checks the semantics of the lock
//! calls — compliance retention set, extended, refusing a delete — never the durability the
//! Garage tests check. Its buckets are created with Object Lock enabled (and so versioning).
//!
//! The checks go through boto3 (a dependency of moto's server), the client an operator would use
//! to try deleting a locked object.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

/// A running moto S3 server with one bucket that has Object Lock enabled.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    pub endpoint: String,
    pub bucket: String,
    /// An AWS shared-credentials file (moto accepts any key).
    pub credentials: PathBuf,
}

/// Whether `python3` can import moto's server (`.ci/run` installs `moto[server]`).
#[must_use]
pub fn available() -> bool {
    Command::new("python3")
        .args(["-c", "import moto.server, boto3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Moto {
    /// Starts the server (logging to `dir/moto.log`) and creates `bucket` with Object Lock.
    ///
    /// # Errors
    /// When python3 or moto is missing, or the server does not come up.
    pub fn start(dir: &Path, bucket: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = std::fs::File::create(dir.join("moto.log"))?;
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting python3 -m moto.server (pip install 'moto[server]')")?;
        let credentials = dir.join("credentials");
        std::fs::write(
            &credentials,
            "[default]\naws_access_key_id = coffer\naws_secret_access_key = coffer-secret\n",
        )?;
        let m = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: bucket.to_string(),
            credentials,
        };
        // Polled, bounded: the server answers once Flask is up.
        let mut up = false;
        for _ in 0..300 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                up = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        if !up {
            bail!("moto did not listen on port {port} within 15 s");
        }
        m.py(&format!(
            "s3.create_bucket(Bucket={bucket:?}, ObjectLockEnabledForBucket=True)"
        ))?;
        Ok(m)
    }

    /// Runs `code` in python3 with `s3` a boto3 client of this server and `B` the bucket name;
    /// answers what it printed.
    ///
    /// # Errors
    /// When the script fails.
    pub fn py(&self, code: &str) -> anyhow::Result<String> {
        let script = format!(
            "import boto3, json, datetime\n\
             s3 = boto3.client('s3', endpoint_url={ep:?}, region_name='us-east-1', \
             aws_access_key_id='coffer', aws_secret_access_key='coffer-secret')\n\
             B = {b:?}\n{code}\n",
            ep = self.endpoint,
            b = self.bucket,
        );
        let out = Command::new("python3")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "python: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Every current object under `prefix`: key → (compliance retention's end in seconds since
    /// the epoch, or `None`).
    ///
    /// # Errors
    /// When the listing or a HEAD fails.
    pub fn retention(&self, prefix: &str) -> anyhow::Result<Vec<(String, Option<i64>)>> {
        let out = self.py(&format!(
            "out = []\n\
             for page in s3.get_paginator('list_objects_v2').paginate(Bucket=B, Prefix={prefix:?}):\n\
             \x20   for o in page.get('Contents', []):\n\
             \x20       h = s3.head_object(Bucket=B, Key=o['Key'])\n\
             \x20       d = h.get('ObjectLockRetainUntilDate')\n\
             \x20       c = h.get('ObjectLockMode') == 'COMPLIANCE'\n\
             \x20       out.append([o['Key'], int(d.timestamp()) if d and c else None])\n\
             print(json.dumps(out))"
        ))?;
        Ok(serde_json::from_str(out.trim())?)
    }

    /// Tries to delete every version of `key` for good (what root holding the bucket's
    /// credentials would do); answers how many versions the store refused to delete.
    ///
    /// # Errors
    /// When listing fails or a delete fails other than by the lock's refusal.
    pub fn destroy(&self, key: &str) -> anyhow::Result<usize> {
        let out = self.py(&format!(
            "refused = 0\n\
             vs = s3.list_object_versions(Bucket=B, Prefix={key:?}).get('Versions', [])\n\
             for v in [v for v in vs if v['Key'] == {key:?}]:\n\
             \x20   try:\n\
             \x20       s3.delete_object(Bucket=B, Key={key:?}, VersionId=v['VersionId'])\n\
             \x20   except s3.exceptions.ClientError as e:\n\
             \x20       if e.response['Error']['Code'] != 'AccessDenied': raise\n\
             \x20       refused += 1\n\
             print(refused)"
        ))?;
        Ok(out.trim().parse()?)
    }

    /// The `init --storage` arguments for prefix `prefix`.
    #[must_use]
    pub fn storage_args(&self, prefix: &str) -> Vec<String> {
        vec![
            "--storage".into(),
            format!("s3://{}/{prefix}", self.bucket),
            "--s3-endpoint".into(),
            self.endpoint.clone(),
            "--s3-region".into(),
            "us-east-1".into(),
            "--s3-credentials-file".into(),
            self.credentials.display().to_string(),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
