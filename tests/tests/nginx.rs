//! Issue 5: a real nginx (Debian's package; `.ci/run` installs it) in front of the appliance,
//! configured from `docs/nginx/coffer.conf`, proxying gRPC over TLS to the appliance on TCP and
//! on its unix socket. The client pins nginx's certificate; a backup with a large file and a
//! restore go through it bit-exact.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use coffer_tests::{
    bin, coffer, connect_url, create_snapshot, data, describe, listening, sigterm, Appliance,
    REPO_PASSWORD, USER_PASSWORD,
};

/// nginx's own certificate (what clients see): (cert, key).
fn front_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("front.pem"), dir.join("front.key"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=backup.example"])
        .args(["-addext", "subjectAltName=DNS:backup.example"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl req failed");
    (cert, key)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = sigterm(&mut self.0);
    }
}

/// Renders the documented configuration and starts nginx in the foreground, with a fresh
/// certificate in `dir/front.pem`.
fn nginx(
    dir: &Path,
    listen: &str,
    upstream: &str,
    appliance_cert: &Path,
    ui: (&str, &str),
) -> Nginx {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("nginx is not installed: `bash .ci/run` installs it (apt-get install nginx)");
    let prefix = dir.join("nginx");
    for sub in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(prefix.join(sub)).unwrap();
    }
    let (cert, key) = front_cert(dir);
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/nginx/coffer.conf"),
    )
    .unwrap();
    let conf = template
        .replace("@LISTEN@", listen)
        .replace("@CERT@", cert.to_str().unwrap())
        .replace("@KEY@", key.to_str().unwrap())
        .replace("@UPSTREAM@", upstream)
        .replace("@APPLIANCE_CERT@", appliance_cert.to_str().unwrap())
        .replace("@PREFIX@", prefix.to_str().unwrap())
        .replace("@UI_LISTEN@", ui.0)
        .replace("@UI_UPSTREAM@", ui.1);
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let check = Command::new(nginx)
        .arg("-t")
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let child = Command::new(nginx)
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path)
        // Workers run as root here so they can reach the test's unix socket.
        .args(["-g", "daemon off; user root;"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // Ready when it accepts connections (polling a condition).
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(listen).is_err() {
        assert!(start.elapsed().as_secs() < 20, "nginx did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Nginx(child)
}

fn run_through_nginx(upstream_unix: bool) {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::init(dir.path(), 2, 64 << 10, &["alice@laptop"]).unwrap();
    let sock = dir.path().join("coffer.sock");
    let listen = if upstream_unix {
        format!("unix:{}", sock.display())
    } else {
        "127.0.0.1:0".to_string()
    };
    let appliance_cert = dir.path().join("appliance.pem");
    let ui_upstream = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(bin("coffer-appliance"))
        .args(["serve", "--repo", &app.repo_str(), "--listen", &listen])
        .args(["--ui-listen", &ui_upstream])
        .arg("--tls-generate-cert")
        .arg("--tls-cert-file")
        .arg(&appliance_cert)
        .arg("--tls-key-file")
        .arg(dir.path().join("appliance.key"))
        .env("COFFER_REPO_PASSWORD", REPO_PASSWORD)
        .env("COFFER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (upstream, _) = listening(&mut child);
    let front = format!("127.0.0.1:{}", free_port());
    let ui_front = format!("127.0.0.1:{}", free_port());
    let _nginx = nginx(
        dir.path(),
        &front,
        &upstream,
        &appliance_cert,
        (&ui_front, &ui_upstream),
    );
    let fp = fingerprint_of(&dir.path().join("front.pem"));

    let cfg = dir.path().join("client.json");
    connect_url(&cfg, &format!("https://{front}"), &fp, "alice", "laptop");
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    // A large file: many upload batches and a long restore stream through nginx.
    std::fs::write(src.join("large.bin"), data(1, 48 << 20, false)).unwrap();
    for i in 0..50u64 {
        std::fs::write(
            src.join("sub").join(format!("f{i}")),
            data(10 + i, 3000, true),
        )
        .unwrap();
    }
    let snap = create_snapshot(&cfg, &src);
    let target = dir.path().join("restored");
    let id = snap["snapshot"].as_str().unwrap();
    let (rc, out, err) = coffer(&cfg, &["restore", id, target.to_str().unwrap()]).unwrap();
    assert_eq!(rc, 0, "{out}{err}");
    assert_eq!(describe(&src).unwrap(), describe(&target).unwrap());
    ui_through_nginx(dir.path(), &ui_front, id, &src.join("large.bin"));
    assert_eq!(sigterm(&mut child), Some(0));
}

/// The web UI through nginx's second server block: log in (cookies and CSRF token survive the
/// proxy), see the snapshot, and download the large file whole, streamed.
fn ui_through_nginx(dir: &Path, front: &str, snapshot: &str, file: &Path) {
    let jar = dir.join("ui.jar");
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-sk", "-c"])
            .arg(&jar)
            .arg("-b")
            .arg(&jar)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "curl {args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let base = format!("https://{front}");
    let form = curl(&[&format!("{base}/login")]);
    let at = form.find("name=\"csrf\" value=\"").expect("the login form") + 19;
    let token = &form[at..at + 32];
    let code = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--data-urlencode",
        "identity=alice@laptop",
        "--data-urlencode",
        &format!("password={USER_PASSWORD}"),
        "--data-urlencode",
        &format!("csrf={token}"),
        &format!("{base}/login"),
    ]);
    assert_eq!(code, "303", "login through nginx");
    assert!(curl(&[&format!("{base}/")]).contains(snapshot));
    let got = dir.join("large.download");
    curl(&[
        "-o",
        got.to_str().unwrap(),
        &format!("{base}/snapshots/{snapshot}/file?path=large.bin"),
    ]);
    assert!(
        std::fs::read(&got).unwrap() == std::fs::read(file).unwrap(),
        "the download differs"
    );
}

fn fingerprint_of(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .rsplit('=')
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn backup_and_restore_through_nginx_to_tcp() {
    run_through_nginx(false);
}

#[test]
fn backup_and_restore_through_nginx_to_the_unix_socket() {
    run_through_nginx(true);
}
