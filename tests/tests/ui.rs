//! Issue 16 (web UI): a real headless Chromium logs in, browses a snapshot, downloads a file and
//! compares its bytes, fails to reach another user's snapshot by its URL, and sees an operator's
//! freshness table mark a host late; and the session and CSRF rules refuse what they must
//! (a form without its token, another user's cookie, a logged-out cookie).

use std::path::{Path, PathBuf};
use std::process::Command;

use coffer_tests::{admin, connect_client, create_snapshot, data, Appliance, USER_PASSWORD};

const ALICE: &str = "alice@laptop";
const BOB: &str = "bob@desk";
const CAROL: &str = "carol@admin";
/// The UI's session cookie.
const COOKIE: &str = "__Host-coffer_ui";

/// An appliance with three accounts: alice (a 1h schedule), bob, and carol, an operator (FULL on
/// the acl, user and policy targets).
fn appliance(dir: &Path, extra: &[&str]) -> Appliance {
    let mut app = Appliance::init(dir, 2, 16 * 1024, &[ALICE, BOB, CAROL]).unwrap();
    admin(&app, &["acl", "enable"]);
    for target in ["type=acl", "type=user", "type=policy"] {
        admin(
            &app,
            &[
                "acl", "add", "--user", CAROL, "--access", "FULL", "--target", target,
            ],
        );
    }
    admin(&app, &["policy", "set", ALICE, "--schedule", "1h"]);
    app.serve_args = ["--ui-listen", "127.0.0.1:0"]
        .iter()
        .chain(extra)
        .map(|s| (*s).to_string())
        .collect();
    app.start().unwrap();
    app
}

fn snapshot_id(v: &serde_json::Value) -> String {
    v["snapshot"].as_str().expect("snapshot id").to_string()
}

#[test]
fn a_browser_downloads_what_it_may_and_the_operator_sees_who_is_late() {
    assert!(
        Path::new("/usr/bin/chromium").exists() && Path::new("/usr/bin/chromedriver").exists(),
        "Debian's chromium and chromium-driver are needed (.ci/run installs them)"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut app = appliance(dir.path(), &[]);

    // alice: two snapshots of a tree (the second changes one file); bob: one of his own.
    let src = dir.path().join("alice-src");
    std::fs::create_dir_all(src.join("projects/report")).unwrap();
    std::fs::write(
        src.join("projects/report/figures.bin"),
        data(7, 3 << 20, false),
    )
    .unwrap();
    std::fs::write(src.join("projects/notes.txt"), b"first draft\n").unwrap();
    for i in 0..20u64 {
        std::fs::write(
            src.join(format!("projects/small-{i}.txt")),
            data(i, 900, true),
        )
        .unwrap();
    }
    let cfg_a = dir.path().join("alice.json");
    connect_client(&app, &cfg_a, "alice", "laptop");
    let older = snapshot_id(&create_snapshot(&cfg_a, &src));
    std::fs::write(src.join("projects/notes.txt"), b"second draft, longer\n").unwrap();
    let newer = snapshot_id(&create_snapshot(&cfg_a, &src));
    let bsrc = dir.path().join("bob-src");
    std::fs::create_dir_all(&bsrc).unwrap();
    std::fs::write(bsrc.join("bob-payroll.csv"), b"name,salary\n").unwrap();
    let cfg_b = dir.path().join("bob.json");
    connect_client(&app, &cfg_b, "bob", "desk");
    let bobs = snapshot_id(&create_snapshot(&cfg_b, &bsrc));

    // Three hours later (the appliance's clock, shifted at start): alice's 1h schedule fired
    // twice without a backup.
    app.stop().unwrap();
    app.serve_env = vec![("COFFER_CLOCK_OFFSET_SECS".into(), "10800".into())];
    app.start().unwrap();

    let downloads = dir.path().join("downloads");
    let shots = dir.path().join("shots");
    std::fs::create_dir_all(&downloads).unwrap();
    std::fs::create_dir_all(&shots).unwrap();
    let plan = serde_json::json!({
        "ui": app.ui_url.as_ref().expect("UI ON printed"),
        "password": USER_PASSWORD,
        "alice": ALICE, "bob": BOB, "carol": CAROL,
        "alice_snapshot": newer, "alice_older": older, "bob_snapshot": bobs,
        "file": "projects/report/figures.bin",
        "source": src.join("projects/report/figures.bin"),
        "changed": "projects/notes.txt",
        "bob_file": "bob-payroll.csv",
        "downloads": downloads, "shots": shots,
    });
    let out = Command::new("/usr/bin/python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("ui/browser.py"))
        .arg(plan.to_string())
        .output()
        .expect("python3 with selenium (Debian's python3-selenium)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "browser test: {text}\n{}",
        app.log_tail()
    );
    for name in ["login", "snapshots", "browse", "diff", "operator", "audit"] {
        let p = shots.join(format!("{name}.png"));
        assert!(std::fs::metadata(&p).is_ok_and(|m| m.len() > 1000), "{p:?}");
    }
    // Where screenshots are wanted (docs/ui/), they are kept.
    if let Ok(keep) = std::env::var("COFFER_UI_SHOTS") {
        std::fs::create_dir_all(&keep).unwrap();
        for e in std::fs::read_dir(&shots).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), PathBuf::from(&keep).join(e.file_name())).unwrap();
        }
    }
    // Every web login, download and refusal went through the log: no password in it.
    let log = std::fs::read_to_string(&app.log).unwrap();
    assert!(!log.contains(USER_PASSWORD));
    assert!(log.contains("web UI download"), "downloads are logged");
}

/// A browser's state for curl: its cookie jar and the last page.
struct Browser {
    ui: String,
    jar: PathBuf,
    dir: PathBuf,
}

/// An answer: status, headers, body.
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

impl Browser {
    fn new(ui: &str, dir: &Path, name: &str) -> Self {
        Self {
            ui: ui.trim_end_matches('/').to_string(),
            jar: dir.join(format!("{name}.jar")),
            dir: dir.to_path_buf(),
        }
    }

    /// `curl` with this browser's cookies; `form` fields make it a POST.
    fn call(&self, path: &str, form: &[(&str, &str)], cookie: Option<&str>) -> Answer {
        let (hdr, body) = (self.dir.join("h.txt"), self.dir.join("b.txt"));
        let mut c = Command::new("curl");
        c.args(["-sk", "-o"]).arg(&body).arg("-D").arg(&hdr);
        c.args(["-w", "%{http_code}"]);
        match cookie {
            Some(v) => {
                c.args(["-H", &format!("Cookie: {v}")]);
            }
            None => {
                c.arg("-c").arg(&self.jar).arg("-b").arg(&self.jar);
            }
        }
        for (k, v) in form {
            c.args(["--data-urlencode", &format!("{k}={v}")]);
        }
        let out = c.arg(format!("{}{path}", self.ui)).output().expect("curl");
        Answer {
            status: String::from_utf8_lossy(&out.stdout)
                .parse()
                .expect("a status"),
            headers: std::fs::read_to_string(&hdr).unwrap_or_default(),
            body: std::fs::read_to_string(&body).unwrap_or_default(),
        }
    }

    fn get(&self, path: &str) -> Answer {
        self.call(path, &[], None)
    }

    /// A POST of `form` (a form with no fields still is a POST: it carries no token).
    fn post(&self, path: &str, form: &[(&str, &str)]) -> Answer {
        if form.is_empty() {
            return self.call(path, &[("nothing", "")], None);
        }
        self.call(path, form, None)
    }

    /// The CSRF token on `path`'s page.
    fn token(&self, path: &str) -> String {
        csrf_in(&self.get(path).body)
    }

    fn login(&self, identity: &str, password: &str) -> Answer {
        let t = self.token("/login");
        self.post(
            "/login",
            &[("identity", identity), ("password", password), ("csrf", &t)],
        )
    }

    /// `curl -o to` of `path` with this browser's cookies (`--limit-rate` when given).
    fn fetch_to(&self, path: &str, to: &Path, rate: Option<&str>) -> Command {
        let mut c = Command::new("curl");
        c.arg("-sfk");
        if let Some(r) = rate {
            c.args(["--limit-rate", r]);
        }
        c.arg("-o").arg(to).arg("-b").arg(&self.jar);
        c.arg(format!("{}{path}", self.ui));
        c
    }

    /// A whole download: curl's exit status.
    fn download(&self, path: &str, to: &Path) -> std::process::ExitStatus {
        self.fetch_to(path, to, None).status().unwrap()
    }

    /// A download at 2 MB/s, running.
    fn download_slowly(&self, path: &str, to: &Path) -> std::process::Child {
        self.fetch_to(path, to, Some("2M")).spawn().unwrap()
    }

    /// The session cookie's value.
    fn cookie(&self) -> String {
        let jar = std::fs::read_to_string(&self.jar).unwrap();
        jar.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f.len() == 7 && f[5] == COOKIE).then(|| f[6].to_string())
            })
            .expect("a session cookie")
    }
}

fn csrf_in(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    page[at..at + 32].to_string()
}

/// A running appliance (with `--random-password`), alice's snapshot of one small file, and the
/// UI's address.
struct Setup {
    dir: tempfile::TempDir,
    app: Appliance,
    snap: String,
    ui: String,
}

fn setup(file: &[u8]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let app = appliance(dir.path(), &["--random-password"]);
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("secret.txt"), file).unwrap();
    let cfg = dir.path().join("alice.json");
    connect_client(&app, &cfg, "alice", "laptop");
    let snap = snapshot_id(&create_snapshot(&cfg, &src));
    let ui = app.ui_url.clone().expect("UI ON printed");
    Setup { dir, app, snap, ui }
}

impl Setup {
    fn browser(&self, name: &str) -> Browser {
        Browser::new(&self.ui, self.dir.path(), name)
    }

    /// No password, generated password or cookie in the appliance's log.
    fn log_holds_none_of(&self, secrets: &[&str]) {
        let log = std::fs::read_to_string(&self.app.log).unwrap();
        for s in secrets.iter().chain([&USER_PASSWORD]) {
            assert!(!log.contains(s), "a secret is in the log");
        }
    }
}

#[test]
fn logins_need_the_forms_token_and_pages_carry_the_strict_policy() {
    let t = setup(b"alice's secret\n");
    let alice = t.browser("alice");
    // The login form's token needs the login form's cookie.
    let token = csrf_in(&alice.get("/login").body);
    let r = t.browser("stranger").post(
        "/login",
        &[
            ("identity", ALICE),
            ("password", USER_PASSWORD),
            ("csrf", &token),
        ],
    );
    assert_eq!(
        r.status, 403,
        "a login without the form's cookie: {}",
        r.body
    );
    let r = alice.login(ALICE, "not-the-password");
    assert_eq!(r.status, 401);
    assert!(r.body.contains("unknown user or wrong password"));
    let r = alice.login(ALICE, USER_PASSWORD);
    assert_eq!(r.status, 303);
    let set = r.headers.to_ascii_lowercase();
    assert!(
        set.contains("set-cookie: __host-coffer_ui=")
            && set.contains("httponly; secure; samesite=strict"),
        "{set}"
    );
    // Every page carries the strict policy: no scripts, nothing from elsewhere.
    let page = alice.get("/");
    assert_eq!(page.status, 200);
    assert!(page.body.contains(&t.snap));
    let h = page.headers.to_ascii_lowercase();
    assert!(
        h.contains("content-security-policy: default-src 'none'"),
        "{h}"
    );
    assert!(!h.contains("unsafe-inline") && !page.body.contains("<script"));
    // The built-in administrator of --random-password: only with the printed password.
    let root = t.browser("root");
    assert_eq!(root.login("admin", "a-guess").status, 401);
    let pw = t
        .app
        .server_password
        .clone()
        .expect("SERVER PASSWORD printed");
    assert_eq!(root.login("admin", &pw).status, 303);
    assert!(root.get("/operator").body.contains(ALICE));
    let file = format!("/snapshots/{}/file?path=secret.txt", t.snap);
    assert_eq!(root.get(&file).body, "alice's secret\n");
    t.log_holds_none_of(&[&pw, &alice.cookie()]);
}

#[test]
fn forms_without_their_sessions_token_change_nothing() {
    let t = setup(b"x");
    let (alice, carol) = (t.browser("alice"), t.browser("carol"));
    assert_eq!(alice.login(ALICE, USER_PASSWORD).status, 303);
    assert_eq!(carol.login(CAROL, USER_PASSWORD).status, 303);
    let r = alice.post("/logout", &[]);
    assert_eq!(r.status, 403);
    assert_eq!(
        alice.get("/").status,
        200,
        "a refused logout ended the session"
    );
    let set_schedule = |who: &Browser, token: &str| {
        who.post(
            "/operator/policies",
            &[
                ("target", BOB),
                ("field", "schedule"),
                ("value", "2h"),
                ("csrf", token),
            ],
        )
    };
    let policies = || admin(&t.app, &["policy", "list"]);
    assert_eq!(set_schedule(&carol, "").status, 403);
    assert_eq!(set_schedule(&carol, &alice.token("/")).status, 403);
    assert!(!policies().contains("2h"), "{}", policies());
    let r = set_schedule(&carol, &carol.token("/operator/policies"));
    assert_eq!(r.status, 303);
    assert!(
        policies().contains("2h"),
        "the operator's own token works: {}",
        policies()
    );
    // Counting space walks every snapshot: a POST with the token too.
    assert_eq!(carol.post("/operator", &[]).status, 403);
    let r = carol.post("/operator", &[("csrf", &carol.token("/operator"))]);
    assert!(
        r.status == 200 && r.body.contains("Only theirs"),
        "{}",
        r.body
    );
}

#[test]
fn another_users_cookie_reads_as_that_user() {
    let t = setup(b"alice's secret\n");
    let (alice, bob) = (t.browser("alice"), t.browser("bob"));
    assert_eq!(alice.login(ALICE, USER_PASSWORD).status, 303);
    assert_eq!(bob.login(BOB, USER_PASSWORD).status, 303);
    let snap = &t.snap;
    for path in [
        format!("/snapshots/{snap}"),
        format!("/snapshots/{snap}/file?path=secret.txt"),
        format!("/snapshots/{snap}/tar"),
        format!("/diff?a={snap}&b={snap}"),
    ] {
        let r = bob.get(&path);
        assert_eq!(r.status, 404, "{path}: {}", r.body);
        assert!(!r.body.contains("secret"), "{path}");
        assert_eq!(alice.get(&path).status, 200, "{path}");
    }
    assert!(!bob.get("/").body.contains(snap.as_str()));
    assert_eq!(bob.get("/operator").status, 403);
    let r = bob.post(
        "/operator/accounts",
        &[
            ("op", "disable"),
            ("identity", ALICE),
            ("csrf", &bob.token("/")),
        ],
    );
    assert_eq!(r.status, 403);
    assert_eq!(alice.get("/").status, 200, "bob disabled alice");
    // alice's whole snapshot as a .tar, streamed: it unpacks to the source.
    let tar = t.dir.path().join("all.tar");
    assert!(alice
        .download(&format!("/snapshots/{snap}/tar"), &tar)
        .success());
    let out = t.dir.path().join("untarred");
    std::fs::create_dir_all(&out).unwrap();
    let untar = Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&out)
        .status();
    assert!(untar.unwrap().success());
    let top = std::fs::read_dir(&out)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        std::fs::read(top.join("secret.txt")).unwrap(),
        b"alice's secret\n"
    );
}

#[test]
fn restricted_roles_see_what_their_role_allows_and_are_no_operators() {
    let t = setup(b"x");
    let snap = &t.snap;
    for (who, role) in [("wo@box", "write-only"), ("lo@box", "log-only")] {
        admin(&t.app, &["user", "add", who, "--role", role]);
        for target in ["type=acl", "type=snapshot,username=alice"] {
            admin(
                &t.app,
                &[
                    "acl", "add", "--user", who, "--access", "FULL", "--target", target,
                ],
            );
        }
    }
    let (wo, lo) = (t.browser("wo"), t.browser("lo"));
    assert_eq!(wo.login("wo@box", USER_PASSWORD).status, 303);
    assert_eq!(lo.login("lo@box", USER_PASSWORD).status, 303);
    // Write-only lists nothing; log-only lists alice's snapshot but cannot open it.
    assert!(!wo.get("/").body.contains(snap.as_str()));
    assert!(lo.get("/").body.contains(snap.as_str()));
    for b in [&wo, &lo] {
        assert_eq!(b.get(&format!("/snapshots/{snap}")).status, 404);
        assert_eq!(
            b.get("/operator").status,
            403,
            "a restricted role is an operator"
        );
    }
    // An operator's password reset ends the account's sessions, in the UI too.
    let (alice, carol) = (t.browser("alice"), t.browser("carol"));
    assert_eq!(alice.login(ALICE, USER_PASSWORD).status, 303);
    assert_eq!(alice.get(&format!("/snapshots/{snap}")).status, 200);
    assert_eq!(carol.login(CAROL, USER_PASSWORD).status, 303);
    let token = carol.token("/operator/accounts");
    let r = carol.post(
        "/operator/accounts",
        &[
            ("op", "password"),
            ("identity", ALICE),
            ("password", "a-new-password"),
            ("csrf", &token),
        ],
    );
    assert_eq!(r.status, 303);
    // What was done is told once, on the next page, and never through the URL.
    assert!(!r.headers.contains("done="), "{}", r.headers);
    let page = carol.get("/operator/accounts").body;
    assert!(
        page.contains("set a new password for alice@laptop"),
        "{page}"
    );
    assert!(!carol
        .get("/operator/accounts")
        .body
        .contains("set a new password"));
    let spoof = carol
        .get("/operator/accounts?done=log+in+at+evil.example")
        .body;
    assert!(!spoof.contains("evil.example"));
    assert_eq!(alice.get(&format!("/snapshots/{snap}")).status, 303);
    assert_eq!(alice.login(ALICE, "a-new-password").status, 303);
}

#[test]
fn logged_out_cookies_and_their_downloads_are_dead() {
    // 24 MiB that do not compress: a download that takes seconds at 2 MB/s.
    let t = setup(&data(5, 24 << 20, false));
    let alice = t.browser("alice");
    assert_eq!(alice.login(ALICE, USER_PASSWORD).status, 303);
    let snap = &t.snap;
    let file = format!("/snapshots/{snap}/file?path=secret.txt");
    // A download in progress stops when its session ends: cut short, never whole.
    let part = t.dir.path().join("part");
    let mut slow = alice.download_slowly(&file, &part);
    assert!(
        coffer_tests::eventually(std::time::Duration::from_secs(20), || {
            std::fs::metadata(&part).is_ok_and(|m| m.len() > 0)
        }),
        "the download did not start"
    );
    let old = alice.cookie();
    let token = alice.token("/");
    assert_eq!(alice.post("/logout", &[("csrf", &token)]).status, 303);
    let status = slow.wait().unwrap();
    assert!(!status.success(), "the download completed after the logout");
    assert!(std::fs::metadata(&part).unwrap().len() < 24 << 20);
    // The cookie, replayed by hand, is dead; so is its token.
    let replay = format!("{COOKIE}={old}");
    for path in ["/", file.as_str()] {
        let r = alice.call(path, &[], Some(&replay));
        assert_eq!(r.status, 303, "{path}");
        assert!(r.headers.to_ascii_lowercase().contains("location: /login"));
    }
    assert_eq!(
        alice
            .call("/logout", &[("csrf", &token)], Some(&replay))
            .status,
        401
    );
    t.log_holds_none_of(&[&old]);

    // One account cannot take every download slot: its fourth waits, others' do not.
    assert_eq!(alice.login(ALICE, USER_PASSWORD).status, 303);
    let mut running = Vec::new();
    for i in 0..3 {
        let to = t.dir.path().join(format!("slow-{i}"));
        running.push(alice.download_slowly(&file, &to));
        let started = coffer_tests::eventually(std::time::Duration::from_secs(20), || {
            std::fs::metadata(&to).is_ok_and(|m| m.len() > 0)
        });
        assert!(started, "download {i} did not start");
    }
    let r = alice.get(&file);
    assert_eq!(r.status, 503, "a fourth download of one account");
    assert!(r.body.contains("already has 3 downloads"), "{}", r.body);
    let root = t.browser("root");
    let pw = t
        .app
        .server_password
        .clone()
        .expect("SERVER PASSWORD printed");
    assert_eq!(root.login("admin", &pw).status, 303);
    let whole = t.dir.path().join("whole");
    assert!(
        root.download(&file, &whole).success(),
        "another account was blocked"
    );
    assert_eq!(std::fs::metadata(&whole).unwrap().len(), 24 << 20);
    for mut c in running {
        let _ = c.kill();
        let _ = c.wait();
    }
}
