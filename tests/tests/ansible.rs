//! Issue 5: `ansible-playbook -i ansible/inventory/local.yml ansible/site.yml` (connection local,
//! the no-systemd mode) provisions an appliance, an nginx front and a client on this machine,
//! under a temporary root; a second run changes nothing; the client's scheduled snapshot runs
//! and restores bit-exact; `ansible-lint` is clean. `.ci/run` installs ansible-core and
//! ansible-lint from PyPI.

use std::path::Path;
use std::process::Command;

use coffer_tests::{bin_dir, data, describe};

fn ansible_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ansible")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn playbook(vars: &Path) -> String {
    let dir = ansible_dir();
    let out = Command::new("ansible-playbook")
        .current_dir(&dir)
        .args(["-i", "inventory/local.yml", "site.yml", "-e"])
        .arg(format!("@{}", vars.display()))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_FORCE_COLOR", "0")
        .output()
        .expect("ansible-playbook is not installed: `bash .ci/run` installs it (pip install ansible-core)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ansible-playbook failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The PLAY RECAP lines: (host, changed).
fn changed(recap: &str) -> Vec<(String, u32)> {
    recap
        .lines()
        .filter(|l| l.contains(" ok=") && l.contains("changed="))
        .map(|l| {
            let host = l.split_whitespace().next().unwrap().to_string();
            let n = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("changed="))
                .unwrap()
                .parse()
                .unwrap();
            (host, n)
        })
        .collect()
}

fn stop(pidfile: &Path) {
    if let Ok(pid) = std::fs::read_to_string(pidfile) {
        let _ = Command::new("kill").args(["-TERM", pid.trim()]).status();
    }
}

/// `ansible-lint --offline` over the roles.
fn ansible_lint_is_clean() {
    let linted = Command::new("ansible-lint")
        .current_dir(ansible_dir().join(".."))
        .args(["--offline", "--nocolor", "ansible/"])
        .output()
        .expect(
            "ansible-lint is not installed: `bash .ci/run` installs it (pip install ansible-lint)",
        );
    assert!(
        linted.status.success(),
        "ansible-lint:\n{}{}",
        String::from_utf8_lossy(&linted.stdout),
        String::from_utf8_lossy(&linted.stderr)
    );
}

/// Runs the provisioned client with its configuration.
fn client(coffer: &Path, cfg: &Path, args: &[&str]) -> std::process::Output {
    Command::new(coffer)
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap()
}

/// The client enrolled with a one-time token from the appliance role: no password was handed
/// out; the client generated its own, and the audit shows the token made and redeemed.
fn enrolled_with_a_token(root: &Path, cfg: &Path) {
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg).unwrap()).unwrap();
    assert_eq!(saved["password"].as_str().unwrap().len(), 48, "{saved}");
    let audit = Command::new(root.join("usr/local/bin/coffer-appliance"))
        .args(["audit", "show", "--repo"])
        .arg(root.join("srv/coffer"))
        .output()
        .unwrap();
    let audit = String::from_utf8_lossy(&audit.stdout);
    assert!(
        audit.contains("enroll.create") && audit.contains("enroll.redeem"),
        "{audit}"
    );
}

/// Shell completions and manual pages, generated from the binaries' own definitions.
fn help_files_installed(root: &std::path::Path) {
    for (file, needle) in [
        (
            "usr/share/bash-completion/completions/coffer",
            "complete -F",
        ),
        (
            "usr/share/bash-completion/completions/coffer-appliance",
            "complete -F",
        ),
        ("usr/local/share/man/man1/coffer.1", ".TH coffer"),
        (
            "usr/local/share/man/man1/coffer-appliance.1",
            ".TH coffer-appliance",
        ),
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_default();
        assert!(text.contains(needle), "{file}: {text:.200}");
    }
}

#[test]
fn playbook_provisions_idempotently_and_the_scheduled_snapshot_restores() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let src = dir.path().join("data");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    for i in 0..20u64 {
        std::fs::write(src.join("etc").join(format!("f{i}")), data(i, 5_000, true)).unwrap();
    }
    std::fs::write(src.join("blob"), data(99, 3 << 20, false)).unwrap();
    let vars = serde_json::json!({
        "coffer_root": root,
        "coffer_bin_src": bin_dir(),
        "coffer_listen": format!("127.0.0.1:{}", free_port()),
        "coffer_front_listen": format!("127.0.0.1:{}", free_port()),
        // The client backs up what the appliance's policy schedules, on a timer made from it.
        "coffer_backup_paths": [],
        "coffer_backup_schedule": "policy",
        "coffer_policies": [{
            "target": format!("alice@laptop:{}", src.display()),
            "policy": {"schedule": "daily 02:30"},
        }],
    });
    let vars_file = dir.path().join("vars.json");
    std::fs::write(&vars_file, vars.to_string()).unwrap();

    let first = playbook(&vars_file);
    let hosts = changed(&first);
    assert_eq!(hosts.len(), 3, "{first}");
    assert!(
        hosts.iter().all(|(_, n)| *n > 0),
        "the first run changes things: {hosts:?}"
    );
    let second = playbook(&vars_file);
    let again = changed(&second);
    assert!(
        again.iter().all(|(_, n)| *n == 0),
        "a second run must report changed=0: {again:?}\n{second}"
    );

    let timer =
        std::fs::read_to_string(root.join("etc/systemd/system/coffer-backup.timer")).unwrap();
    assert!(
        timer.contains("OnCalendar=*-*-* 02:30:00 UTC"),
        "the timer comes from the policy's schedule:\n{timer}"
    );
    // The client's scheduled snapshot, run by hand (no systemd here), then a restore.
    help_files_installed(&root);
    let script = root.join("usr/local/bin/coffer-backup");
    let out = Command::new(&script).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let coffer = root.join("usr/local/bin/coffer");
    let cfg = root.join("etc/coffer-client/client.json");
    let list = client(&coffer, &cfg, &["snapshot", "list", "--json"]);
    let line = String::from_utf8_lossy(&list.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();
    let snap: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(snap["identity"], "alice@laptop");
    let target = dir.path().join("restored");
    let out = client(
        &coffer,
        &cfg,
        &[
            "restore",
            snap["id"].as_str().unwrap(),
            target.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(describe(&src).unwrap(), describe(&target).unwrap());
    // The inventory's access rule is in force.
    let acl = Command::new(root.join("usr/local/bin/coffer-appliance"))
        .args(["acl", "list", "--repo"])
        .arg(root.join("srv/coffer"))
        .output()
        .unwrap();
    let acl = String::from_utf8_lossy(&acl.stdout);
    assert!(acl.contains("user=auditor@*  access=READ"), "{acl}");
    enrolled_with_a_token(&root, &cfg);
    // The role made an append-only repository (its default): the client cannot delete.
    assert!(
        acl.contains("default-own-snapshots  user=*@*  access=APPEND"),
        "{acl}"
    );
    let delete = client(
        &coffer,
        &cfg,
        &["snapshot", "delete", snap["id"].as_str().unwrap()],
    );
    assert!(
        !delete.status.success(),
        "an append-only client deleted a snapshot"
    );

    stop(&root.join("etc/coffer-front/nginx.pid"));
    stop(&root.join("run/coffer/appliance.pid"));

    ansible_lint_is_clean();
}
