//! S3 Object Lock: compliance-mode retention on the objects a locked snapshot needs, so that
//! nobody holding the bucket's credentials (root on the appliance included) can destroy them
//! before the lock's end.
//!
//! `object_store` makes no Object Lock calls, so the three used here are built in this file and
//! signed with its SigV4 signer ([`AwsAuthorizer`]) and the same credentials: the bucket's lock
//! configuration (`GET ?object-lock`), an object's retention (read from `HEAD`, the headers
//! every S3 implementation returns; `GET ?retention` is not answered alike everywhere) and
//! `PUT ?retention` (with the `Content-MD5` S3 requires there).
//!
//! Invariants kept here:
//! * Retention is only ever set in compliance mode, and only ever moved later: a date is read
//!   first, and an object whose retention already reaches the date is left alone (a store
//!   refuses to shorten compliance retention anyway).
//! * Nothing here deletes. What may be deleted is the GC's decision, which asks
//!   [`super::s3::Tier::retained`] first and leaves retained packs alone.
//!
//! Owns: the wire format of these calls. Must never decide which objects are locked
//! (`maintenance::gc`'s lock pass does) nor for how long (the catalog's snapshot locks).

use base64::Engine as _;
use bytes::Bytes;
use md5::{Digest as _, Md5};
use object_store::aws::{AwsAuthorizer, AwsCredential};
use object_store::client::HttpRequestBody;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;

use super::s3::{TierError, Timeouts};

/// Characters an S3 key segment keeps unencoded in a URL (RFC 3986 unreserved).
const KEY_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Whether the bucket can hold retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockSupport {
    /// Object Lock is enabled on the bucket.
    Enabled,
    /// Not available, and why (said at `init` and at each start).
    Unavailable(String),
}

/// An object's retention as the store reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retained {
    /// Compliance mode (governance retention can be bypassed by whoever has the permission).
    pub compliance: bool,
    pub until_us: i64,
}

/// The Object Lock calls for one bucket.
pub struct ObjectLock {
    http: reqwest::Client,
    /// `scheme://host[:port]/bucket`: path-style, as the rest of the tier.
    base: String,
    bucket: String,
    region: String,
    credential: AwsCredential,
}

impl std::fmt::Debug for ObjectLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectLock")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct LockConfiguration {
    object_lock_enabled: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct S3Error {
    code: Option<String>,
    message: Option<String>,
}

/// The error code and message of an S3 error body (empty when it is not one).
fn s3_error(body: &[u8]) -> (String, String) {
    let e: S3Error = std::str::from_utf8(body)
        .ok()
        .and_then(|s| quick_xml::de::from_str(s).ok())
        .unwrap_or_default();
    (e.code.unwrap_or_default(), e.message.unwrap_or_default())
}

/// `2027-01-31T12:00:00Z` for `us` (rounded up to the second: retention never ends early).
fn iso8601(us: i64) -> String {
    let secs = us.div_euclid(1_000_000) + i64::from(us.rem_euclid(1_000_000) != 0);
    chrono::DateTime::from_timestamp(secs, 0)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn parse_iso8601(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|d| d.timestamp_micros())
}

impl ObjectLock {
    /// The calls for `bucket` at `endpoint` (AWS's regional endpoint when none is given).
    ///
    /// # Errors
    /// An HTTP client that cannot be built.
    pub fn new(
        endpoint: Option<&str>,
        bucket: &str,
        region: &str,
        credential: AwsCredential,
        timeouts: Timeouts,
    ) -> Result<Self, TierError> {
        super::s3::install_crypto();
        let host = endpoint.map_or_else(
            || format!("https://s3.{region}.amazonaws.com"),
            |e| e.trim_end_matches('/').to_string(),
        );
        let http = reqwest::Client::builder()
            .timeout(timeouts.request)
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| TierError(format!("object lock client: {e}")))?;
        Ok(Self {
            http,
            base: format!("{host}/{bucket}"),
            bucket: bucket.to_string(),
            region: region.to_string(),
            credential,
        })
    }

    fn object_url(&self, key: &str, query: &str) -> String {
        let path: Vec<String> = key
            .split('/')
            .map(|s| percent_encoding::utf8_percent_encode(s, KEY_SEGMENT).to_string())
            .collect();
        format!("{}/{}{query}", self.base, path.join("/"))
    }

    /// Sends one signed request; answers the status, the headers and the body.
    async fn send(
        &self,
        method: http::Method,
        url: &str,
        body: Bytes,
        extra: &[(&'static str, String)],
    ) -> Result<(http::StatusCode, http::HeaderMap, Bytes), TierError> {
        let what = |e: &dyn std::fmt::Display| TierError(format!("{method} {url}: {e}"));
        let mut b = http::Request::builder().method(method.clone()).uri(url);
        for (k, v) in extra {
            b = b.header(*k, v);
        }
        let mut req = b
            .body(HttpRequestBody::from(body.clone()))
            .map_err(|e| what(&e))?;
        AwsAuthorizer::new(&self.credential, "s3", &self.region)
            .try_authorize(&mut req, None)
            .map_err(|e| what(&e))?;
        let resp = self
            .http
            .request(method.clone(), url)
            .headers(req.headers().clone())
            .body(body)
            .send()
            .await
            .map_err(|e| what(&e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map_err(|e| what(&e))?;
        Ok((status, headers, bytes))
    }

    /// Whether Object Lock is enabled on the bucket. A store that does not know the call
    /// (Garage answers an error or a listing) is `Unavailable`, with its answer.
    ///
    /// # Errors
    /// The store unreachable, or a server error.
    pub async fn support(&self) -> Result<LockSupport, TierError> {
        let url = format!("{}?object-lock", self.base);
        let (status, _, body) = self
            .send(http::Method::GET, &url, Bytes::new(), &[])
            .await?;
        if status.is_success() {
            let cfg: LockConfiguration = std::str::from_utf8(&body)
                .ok()
                .and_then(|s| quick_xml::de::from_str(s).ok())
                .unwrap_or_default();
            if cfg.object_lock_enabled.as_deref() == Some("Enabled") {
                return Ok(LockSupport::Enabled);
            }
            return Ok(LockSupport::Unavailable(format!(
                "bucket {} does not have Object Lock enabled (it can only be enabled when a \
                 bucket is created)",
                self.bucket
            )));
        }
        // Only a definite "no" is an answer: any other error (a bad signature, a denied
        // permission, a wrong region, an outage) fails, lest a repository whose packs are
        // retained be taken for one without retention.
        let (code, message) = s3_error(&body);
        match (status, code.as_str()) {
            (_, "ObjectLockConfigurationNotFoundError") => Ok(LockSupport::Unavailable(format!(
                "bucket {} does not have Object Lock enabled (it can only be enabled when a \
                 bucket is created)",
                self.bucket
            ))),
            (http::StatusCode::NOT_IMPLEMENTED, _) | (_, "NotImplemented") => {
                Ok(LockSupport::Unavailable(format!(
                    "the store does not support S3 Object Lock ({code}: {message})"
                )))
            }
            _ => Err(TierError(format!(
                "reading the Object Lock configuration of bucket {}: HTTP {status} {code} \
                 {message} (the key needs s3:GetBucketObjectLockConfiguration)",
                self.bucket
            ))),
        }
    }

    /// Checks, once per start, that retention set here is reported back by `HEAD` (the store
    /// must, and the key needs `s3:GetObjectRetention`): a probe object under `key` retained
    /// for a second, read back, and its version deleted once the second passed.
    ///
    /// # Errors
    /// The store's failures, or retention not reported.
    pub async fn self_check(self: &std::sync::Arc<Self>, key: &str) -> Result<(), TierError> {
        let url = self.object_url(key, "");
        let (status, headers, body) = self
            .send(http::Method::PUT, &url, Bytes::from_static(b"probe"), &[])
            .await?;
        if !status.is_success() {
            let (code, message) = s3_error(&body);
            return Err(TierError(format!(
                "writing the object-lock probe {key}: HTTP {status} {code} {message}"
            )));
        }
        let version = headers
            .get("x-amz-version-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let until = coffer_proto::now_us() + 1_000_000;
        self.retain(key, until).await?;
        let seen = self.retention(key).await?;
        let this = self.clone();
        let k = key.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
            let q = version.map_or_else(String::new, |v| {
                format!(
                    "?versionId={}",
                    percent_encoding::utf8_percent_encode(&v, KEY_SEGMENT)
                )
            });
            let url = this.object_url(&k, &q);
            if let Err(e) = this
                .send(http::Method::DELETE, &url, Bytes::new(), &[])
                .await
            {
                tracing::warn!(error = %e, "deleting the object-lock probe {k}");
            }
        });
        match seen {
            Some(r) if r.compliance && r.until_us >= until - 1_000_000 => Ok(()),
            _ => Err(TierError(format!(
                "the store does not report the retention it holds through HEAD (read back \
                 {seen:?}): the key needs s3:GetObjectRetention; without it the GC cannot tell \
                 which packs are retained"
            ))),
        }
    }

    /// The retention of the current version of `key` (its full name in the bucket); `None`
    /// when it has none or does not exist.
    ///
    /// # Errors
    /// The store's errors.
    pub async fn retention(&self, key: &str) -> Result<Option<Retained>, TierError> {
        let url = self.object_url(key, "");
        let (status, headers, _) = self
            .send(http::Method::HEAD, &url, Bytes::new(), &[])
            .await?;
        if status == http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(TierError(format!(
                "reading the retention of {key}: HTTP {status}"
            )));
        }
        let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        let Some(until) = header("x-amz-object-lock-retain-until-date") else {
            return Ok(None);
        };
        let until_us = parse_iso8601(until).ok_or_else(|| {
            TierError(format!("the retention of {key}: unreadable date {until:?}"))
        })?;
        Ok(Some(Retained {
            compliance: header("x-amz-object-lock-mode") == Some("COMPLIANCE"),
            until_us,
        }))
    }

    /// Sets compliance retention on the current version of `key` until `until_us`.
    ///
    /// # Errors
    /// The store's refusal (a shorter date than it holds, a bucket without Object Lock, a
    /// missing object) or failure.
    pub async fn retain(&self, key: &str, until_us: i64) -> Result<(), TierError> {
        let body = format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <Mode>COMPLIANCE</Mode><RetainUntilDate>{}</RetainUntilDate></Retention>",
            iso8601(until_us)
        );
        let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(body.as_bytes()));
        let url = self.object_url(key, "?retention");
        let (status, _, reply) = self
            .send(
                http::Method::PUT,
                &url,
                Bytes::from(body),
                &[
                    ("content-md5", md5),
                    ("content-type", "application/xml".to_string()),
                ],
            )
            .await?;
        if status.is_success() {
            return Ok(());
        }
        let (code, message) = s3_error(&reply);
        Err(TierError(format!(
            "setting retention on {key} until {}: HTTP {status} {code} {message}",
            iso8601(until_us)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_up_to_the_second_and_read_back() {
        assert_eq!(iso8601(1_800_000_000_000_000), "2027-01-15T08:00:00Z");
        assert_eq!(iso8601(1_800_000_000_000_001), "2027-01-15T08:00:01Z");
        assert_eq!(
            parse_iso8601("2027-01-15T08:00:01.000Z"),
            Some(1_800_000_001_000_000)
        );
        assert_eq!(parse_iso8601("soon"), None);
    }

    #[test]
    fn lock_configuration_and_errors_are_read_from_the_xml() {
        let c: LockConfiguration = quick_xml::de::from_str(
            "<?xml version=\"1.0\"?><ObjectLockConfiguration xmlns=\"x\">\
             <ObjectLockEnabled>Enabled</ObjectLockEnabled></ObjectLockConfiguration>",
        )
        .unwrap();
        assert_eq!(c.object_lock_enabled.as_deref(), Some("Enabled"));
        let (code, msg) =
            s3_error(b"<Error><Code>NotImplemented</Code><Message>nope</Message></Error>");
        assert_eq!((code.as_str(), msg.as_str()), ("NotImplemented", "nope"));
        assert_eq!(s3_error(b"garbage"), (String::new(), String::new()));
    }

    #[test]
    fn keys_are_encoded_per_segment() {
        let l = ObjectLock::new(
            Some("http://127.0.0.1:9000/"),
            "b",
            "r",
            AwsCredential {
                key_id: "k".into(),
                secret_key: "s".into(),
                token: None,
            },
            Timeouts::default(),
        )
        .unwrap();
        assert_eq!(
            l.object_url("p q/packs/ab/x", "?retention"),
            "http://127.0.0.1:9000/b/p%20q/packs/ab/x?retention"
        );
    }
}
