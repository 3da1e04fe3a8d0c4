//! Issue 16 (metrics and logs): `/metrics` behind a bearer token, accepted by `promtool check
//! metrics`, moved by a backup, with label sets that do not grow with files or chunks; log lines
//! in JSON with one line per RPC, and no password or token anywhere in them.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use coffer_tests::{
    admin, coffer, connect_client, create_snapshot, data, Appliance, REPO_PASSWORD, USER_PASSWORD,
};

const TOKEN: &str = "metrics-token-0123456789abcdef";
const WRONG: &str = "wrong-password-for-alice";

/// `GET /metrics` over plain HTTP/1.1: (status, body).
fn scrape(app: &Appliance, token: Option<&str>) -> (u16, String) {
    coffer_tests::scrape_metrics(app, token)
}

/// The value of the one sample named `series` (name and labels exactly as exported).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Every series (name and labels), without values.
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.rsplit_once(' ').unwrap().0.to_string())
        .collect()
}

fn promtool(text: &str) -> (bool, String) {
    let mut c = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; .ci/run installs it)");
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn files(dir: &Path, from: u64, n: u64) {
    std::fs::create_dir_all(dir).unwrap();
    for i in from..from + n {
        std::fs::write(dir.join(format!("f{i}")), data(i, 3000, true)).unwrap();
    }
}

#[test]
fn metrics_need_the_token_pass_promtool_move_with_backups_and_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let mut app = Appliance::init(base, 2, 16 << 10, &["alice@laptop"]).unwrap();
    let token_file = base.join("metrics.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    app.serve_args = vec![
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
        "--metrics-token-file".into(),
        token_file.to_string_lossy().into_owned(),
    ];
    app.start().unwrap();

    assert_eq!(scrape(&app, None).0, 401);
    assert_eq!(scrape(&app, Some("metrics-token-0123456789abcdeX")).0, 401);
    let (status, before) = scrape(&app, Some(TOKEN));
    assert_eq!(status, 200, "{before}");
    assert_eq!(value(&before, "coffer_chunk_raw_bytes_total"), Some(0.0));
    assert!(!before.contains("coffer_last_backup_timestamp_seconds{"));

    let cfg = base.join("alice.json");
    connect_client(&app, &cfg, "alice", "laptop");
    let src = base.join("src");
    files(&src, 0, 5);
    let t0 = coffer_proto::now_us() / 1_000_000;
    let sum = create_snapshot(&cfg, &src);
    let t1 = coffer_proto::now_us() / 1_000_000;
    let (_, after) = scrape(&app, Some(TOKEN));
    let (ok, why) = promtool(&after);
    assert!(ok, "promtool check metrics: {why}\n{after}");
    assert_eq!(
        value(&after, "coffer_backup_logical_bytes_total"),
        Some(sum["bytes"].as_f64().unwrap()),
        "{after}"
    );
    assert!(value(&after, "coffer_chunk_raw_bytes_total").unwrap() >= 5.0 * 3000.0);
    assert!(value(&after, "coffer_chunk_stored_bytes_total").unwrap() > 0.0);
    assert_eq!(value(&after, "coffer_snapshots_committed_total"), Some(1.0));
    let source = format!(
        "coffer_last_backup_timestamp_seconds{{user=\"alice\",host=\"laptop\",path=\"{}\"}}",
        src.display()
    );
    let last = value(&after, &source).unwrap_or_else(|| panic!("{source} in\n{after}"));
    assert!(
        (t0 as f64..=t1 as f64).contains(&last),
        "{t0} <= {last} <= {t1}"
    );
    assert_eq!(
        value(
            &after,
            "coffer_rpcs_total{method=\"CommitSnapshot\",code=\"Ok\"}"
        ),
        Some(1.0),
        "{after}"
    );

    // Cardinality: a backup of 10 more files and one of 300 more export the same series.
    files(&src, 5, 10);
    let _ = create_snapshot(&cfg, &src);
    let small = series(&scrape(&app, Some(TOKEN)).1);
    files(&src, 15, 300);
    let big_sum = create_snapshot(&cfg, &src);
    assert_eq!(big_sum["files"].as_u64(), Some(315), "{big_sum}");
    let (_, text) = scrape(&app, Some(TOKEN));
    assert_eq!(series(&text), small, "series appeared with files or chunks");
    assert!(small.len() < 600, "{} series", small.len());
    assert!(promtool(&text).0);

    // `status` tells the same story through the admin socket.
    let s: serde_json::Value =
        serde_json::from_str(admin(&app, &["status", "--json"]).lines().next().unwrap()).unwrap();
    assert_eq!(s["snapshots_committed"], 3, "{s}");
    assert_eq!(s["shards"], 2);
    assert_eq!(s["mode"], "managed");
    assert_eq!(
        s["received_bytes"].as_f64(),
        value(&text, "coffer_chunk_received_bytes_total"),
        "{s}"
    );
    assert!(s["disk_free_bytes"].as_u64().unwrap() > 0);
    let human = admin(&app, &["status"]);
    assert!(human.contains("3 snapshots covering"), "{human}");
    app.stop().unwrap();
    let out = app.run(&["status", "--repo", &app.repo_str()]).unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not running"),
        "{out:?}"
    );
}

#[test]
fn log_lines_are_json_one_per_rpc_and_hold_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let mut app = Appliance::init(base, 2, 16 << 10, &["alice@laptop"]).unwrap();
    app.serve_env = vec![("COFFER_LOG_FORMAT".into(), "json".into())];
    app.start().unwrap();
    let cfg = base.join("alice.json");
    connect_client(&app, &cfg, "alice", "laptop");
    let src = base.join("src");
    files(&src, 0, 20);
    let _ = create_snapshot(&cfg, &src);

    // A wrong password, refused.
    let bad = base.join("bad.json");
    let url = format!("https://{}", app.addr.as_ref().unwrap());
    let out = Command::new(coffer_tests::bin("coffer"))
        .args(["--config", bad.to_str().unwrap(), "connect", "server"])
        .args(["--url", &url, "--server-cert-fingerprint"])
        .arg(app.fingerprint.as_ref().unwrap())
        .args([
            "--override-username",
            "alice",
            "--override-hostname",
            "laptop",
        ])
        .env("COFFER_PASSWORD", WRONG)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());

    // A machine enrolled by token: the token and the password it was given.
    let text = admin(&app, &["user", "enroll", "fleet@kiosk"]);
    let token = text
        .lines()
        .find(|l| l.starts_with("coffer-enroll-v1:"))
        .unwrap()
        .trim()
        .to_string();
    let kcfg = base.join("kiosk.json");
    let (rc, o, e) = coffer(
        &kcfg,
        &[
            "connect",
            "server",
            "--url",
            &url,
            "--server-cert-fingerprint",
            app.fingerprint.as_ref().unwrap(),
            "--override-username",
            "fleet",
            "--override-hostname",
            "kiosk",
            "--token",
            &token,
        ],
    )
    .unwrap();
    assert_eq!(rc, 0, "{o}{e}");
    let _ = create_snapshot(&kcfg, &src);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&kcfg).unwrap()).unwrap();
    let generated = saved["password"].as_str().unwrap().to_string();
    app.stop().unwrap();

    let log = std::fs::read_to_string(&app.log).unwrap();
    let secrets = [
        USER_PASSWORD,
        REPO_PASSWORD,
        WRONG,
        token.as_str(),
        token.trim_start_matches("coffer-enroll-v1:"),
        generated.as_str(),
    ];
    for s in secrets {
        assert!(!log.contains(s), "a secret in the log: {s}");
    }
    let mut rpcs = Vec::new();
    for l in log.lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        if v["target"] == "coffer::rpc" {
            rpcs.push(v);
        }
    }
    let has = |identity: &str, method: &str, code: &str| {
        rpcs.iter().any(|v| {
            v["identity"] == identity
                && v["method"] == method
                && v["code"] == code
                && v["duration_ms"].is_u64()
                && v["received"].is_u64()
                && v["sent"].is_u64()
        })
    };
    assert!(has("alice@laptop", "CommitSnapshot", "Ok"), "{rpcs:?}");
    assert!(has("alice@laptop", "PutChunks", "Ok"), "{rpcs:?}");
    assert!(has("-", "Hello", "Unauthenticated"), "{rpcs:?}");
    assert!(has("fleet@kiosk", "CommitSnapshot", "Ok"), "{rpcs:?}");
    assert!(rpcs
        .iter()
        .any(|v| v["method"] == "Enroll" && v["code"] == "Ok"));
}
