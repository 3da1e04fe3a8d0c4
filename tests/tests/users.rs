//! Issue 4: accounts, access rules, the server control user, and changes on a running appliance.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coffer_client::{channel, Target};
use coffer_proto::v1::{self, coffer_client::CofferClient};
use coffer_proto::{ChunkId, PROTOCOL_VERSION, SESSION_HEADER};
use coffer_tests::{Appliance, USER_PASSWORD};
use prost::Message as _;
use tonic::transport::Channel;
use tonic::Code;

const CONTROL: &str = "control@appliance";
const CONTROL_PASSWORD: &str = "control-password-1";

/// A raw client: every call carries `token` when there is one.
struct Raw {
    client: CofferClient<Channel>,
    token: Option<String>,
    dedup_key: coffer_proto::DedupKey,
}

impl Raw {
    async fn connect(app: &Appliance) -> Raw {
        let url = format!("https://{}", app.addr.as_ref().unwrap());
        let target = Target::parse(&url, app.fingerprint.as_ref().unwrap()).unwrap();
        Raw {
            client: CofferClient::new(channel(&target).await.unwrap()),
            token: None,
            dedup_key: coffer_proto::DedupKey::from_bytes([0; 32]),
        }
    }

    fn req<T>(&self, m: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        if let Some(t) = &self.token {
            r.metadata_mut().insert(SESSION_HEADER, t.parse().unwrap());
        }
        r
    }

    async fn hello(&mut self, identity: &str, password: &str) -> Result<(), Code> {
        let r = self
            .client
            .hello(v1::HelloRequest {
                protocol_version: PROTOCOL_VERSION,
                identity: identity.into(),
                password: password.into(),
                client_name: "test".into(),
            })
            .await
            .map_err(|s| s.code())?
            .into_inner();
        self.token = Some(r.session_token);
        self.dedup_key = coffer_proto::DedupKey::from_slice(&r.dedup_key).unwrap();
        Ok(())
    }

    /// Uploads `data` as a chunk; returns its id.
    async fn put(&mut self, data: &[u8]) -> Result<ChunkId, Code> {
        let id = coffer_proto::chunk_id(&self.dedup_key, data);
        let frame = v1::ChunkFrame {
            id: Bytes::copy_from_slice(id.as_bytes()),
            raw_len: u32::try_from(data.len()).unwrap(),
            compression: v1::Compression::None.into(),
            data: Bytes::copy_from_slice(data),
        };
        let req = self.req(tokio_stream::iter(vec![v1::PutChunksRequest {
            batch: 0,
            chunks: vec![frame],
        }]));
        let mut s = self
            .client
            .put_chunks(req)
            .await
            .map_err(|s| s.code())?
            .into_inner();
        s.message().await.map_err(|s| s.code())?;
        Ok(id)
    }

    async fn find(&mut self, id: ChunkId) -> Result<(), Code> {
        let req = self.req(tokio_stream::iter(vec![v1::FindMissingRequest {
            ids: Bytes::copy_from_slice(id.as_bytes()),
            envelope_hashes: Bytes::new(),
        }]));
        let mut s = self
            .client
            .find_missing(req)
            .await
            .map_err(|s| s.code())?
            .into_inner();
        s.message().await.map_err(|s| s.code())?;
        Ok(())
    }

    async fn get(&mut self, id: ChunkId) -> Result<(), Code> {
        let req = self.req(tokio_stream::iter(vec![v1::GetChunksRequest {
            ids: Bytes::copy_from_slice(id.as_bytes()),
        }]));
        let mut s = self
            .client
            .get_chunks(req)
            .await
            .map_err(|s| s.code())?
            .into_inner();
        s.message().await.map_err(|s| s.code())?;
        Ok(())
    }

    /// Commits a snapshot of `path` whose root is an empty tree; returns its id.
    async fn commit(&mut self, path: &str) -> Result<Bytes, Code> {
        let root = if self.token.is_some() {
            self.put(&v1::Tree::default().encode_to_vec())
                .await
                .unwrap_or_default()
        } else {
            ChunkId::default()
        };
        let snap = v1::Snapshot {
            path: path.into(),
            root: Bytes::copy_from_slice(root.as_bytes()),
            ..v1::Snapshot::default()
        };
        let r = self
            .client
            .commit_snapshot(self.req(v1::CommitSnapshotRequest {
                snapshot: Some(snap),
                commit_id: bytes::Bytes::new(),
            }))
            .await
            .map_err(|s| s.code())?;
        Ok(r.into_inner().id)
    }

    async fn list(&mut self, all: bool) -> Result<Vec<v1::Snapshot>, Code> {
        let r = self
            .client
            .list_snapshots(self.req(v1::ListSnapshotsRequest {
                path: String::new(),
                all,
            }))
            .await
            .map_err(|s| s.code())?;
        Ok(r.into_inner().snapshots)
    }
}

fn admin(app: &Appliance, args: &[&str]) -> (bool, String) {
    let repo = app.repo_str();
    let mut full: Vec<&str> = args.to_vec();
    full.extend(["--repo", &repo]);
    let out = app.run(&full).unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn rpcs_in_proto() -> Vec<String> {
    let proto = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../proto/proto/coffer/v1/coffer.proto"),
    )
    .unwrap();
    proto
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .map(|l| l.split('(').next().unwrap().trim().to_string())
        .collect()
}

/// S7: every RPC of the service × every role, compared with the table below.
#[test]
#[allow(clippy::too_many_lines)] // the expected-access table is the test: read in one place
fn s7_access_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let users = [
        "alice@laptop",
        "bob@laptop",
        "carol@office",
        "dave@office",
        "erin@office",
        "frank@laptop",
    ];
    let mut app = Appliance::init(dir.path(), 1, 64 << 10, &users).unwrap();
    let (ok, out) = admin(&app, &["acl", "enable"]);
    assert!(ok, "{out}");
    for (who, access) in [
        ("carol@office", "READ"),
        ("dave@office", "APPEND"),
        ("erin@office", "FULL"),
    ] {
        let (ok, out) = admin(
            &app,
            &[
                "acl",
                "add",
                "--user",
                who,
                "--access",
                access,
                "--target",
                "type=snapshot,username=alice,hostname=laptop",
            ],
        );
        assert!(ok, "{out}");
    }
    app.serve_args = vec!["--server-control-username".into(), CONTROL.into()];
    app.serve_env = vec![(
        "COFFER_SERVER_CONTROL_PASSWORD".into(),
        CONTROL_PASSWORD.into(),
    )];
    app.start().unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut alice = Raw::connect(&app).await;
        alice.hello("alice@laptop", USER_PASSWORD).await.unwrap();
        let alices = alice.commit("/home/alice").await.unwrap();

        // The deleted user logs in, then is deleted while its session is open.
        let mut frank = Raw::connect(&app).await;
        frank.hello("frank@laptop", USER_PASSWORD).await.unwrap();
        let (ok, out) = admin(&app, &["user", "delete", "frank@laptop"]);
        assert!(ok, "{out}");

        let rpcs = rpcs_in_proto();
        let roles = [
            "owner",
            "other",
            "reader",
            "appender",
            "full",
            "control",
            "unauthenticated",
            "deleted",
            "wrong-password",
        ];
        let (y, inv, nf, pd, u) = (
            Code::Ok,
            Code::InvalidArgument,
            Code::NotFound,
            Code::PermissionDenied,
            Code::Unauthenticated,
        );
        // Columns in `roles` order. ListSnapshots is "Ok" only when alice's snapshot is listed
        // (with all = true); otherwise the code is NotFound.
        let expected: BTreeMap<&str, [Code; 9]> = BTreeMap::from([
            ("Hello", [y, y, y, y, y, y, inv, u, u]),
            ("FindMissing", [y, y, y, y, y, pd, u, u, u]),
            ("PutChunks", [y, y, y, y, y, pd, u, u, u]),
            ("GetChunks", [y, y, y, y, y, pd, u, u, u]),
            ("CommitSnapshot", [y, y, y, y, y, pd, u, u, u]),
            ("ListSnapshots", [y, nf, y, y, y, pd, u, u, u]),
            ("GetSnapshot", [y, nf, y, y, y, pd, u, u, u]),
            ("OpenSnapshot", [y, nf, y, y, y, pd, u, u, u]),
            ("DeleteSnapshot", [y, nf, pd, pd, y, pd, u, u, u]),
            ("ChangePassword", [y, y, y, y, y, pd, u, u, u]),
            ("Refresh", [pd, pd, pd, pd, pd, y, u, u, u]),
            ("ServerStatus", [pd, pd, pd, pd, pd, y, u, u, u]),
            // Last in the proto, so each column ends its session only after every other probe.
            ("EndSession", [y, y, y, y, y, y, u, u, u]),
            // Every account reads the policy of its own paths (built-in rule).
            ("GetPolicy", [y, y, y, y, y, pd, u, u, u]),
            // Protecting adds (APPEND); locking binds everyone (FULL); alice's policy is hers;
            // nobody holds FULL on the rules.
            ("ProtectSnapshot", [y, nf, pd, y, y, pd, u, u, u]),
            ("LockSnapshot", [y, nf, pd, pd, y, pd, u, u, u]),
            ("SetPolicy", [y, pd, pd, pd, pd, pd, u, u, u]),
            ("AddRule", [pd, pd, pd, pd, pd, pd, u, u, u]),
            // Creating accounts needs FULL on users and rules: nobody here.
            ("CreateEnrollment", [pd, pd, pd, pd, pd, pd, u, u, u]),
            // Without a session: the same answer whoever asks (the probe's password is too
            // short, refused before any token is looked up or throttled).
            ("Enroll", [inv, inv, inv, inv, inv, inv, inv, inv, inv]),
        ]);
        let listed: Vec<&str> = expected.keys().copied().collect();
        let mut in_proto: Vec<String> = rpcs.clone();
        in_proto.sort();
        assert_eq!(
            listed, in_proto,
            "the table must cover exactly the RPCs of the service"
        );

        let mut failures = Vec::new();
        for (col, role) in roles.iter().enumerate() {
            let (identity, password) = match *role {
                "owner" => ("alice@laptop", USER_PASSWORD),
                "other" => ("bob@laptop", USER_PASSWORD),
                "reader" => ("carol@office", USER_PASSWORD),
                "appender" => ("dave@office", USER_PASSWORD),
                "full" => ("erin@office", USER_PASSWORD),
                "control" => (CONTROL, CONTROL_PASSWORD),
                "deleted" => ("frank@laptop", USER_PASSWORD),
                "wrong-password" => ("bob@laptop", "not-the-password"),
                _ => ("", ""),
            };
            // The owner's own ChangePassword ended alice's sessions: log in again.
            alice.hello("alice@laptop", USER_PASSWORD).await.unwrap();
            let mut c = Raw::connect(&app).await;
            let hello = c.hello(identity, password).await;
            if *role == "deleted" {
                c.token.clone_from(&frank.token);
            }
            if *role == "wrong-password" {
                c.token = Some("00".repeat(32));
            }
            // A chunk of this role's own (uploaded by alice when the role cannot upload).
            let own = match c.put(format!("chunk of {role}").as_bytes()).await {
                Ok(id) => id,
                Err(_) => alice
                    .put(b"chunk for roles that cannot upload")
                    .await
                    .unwrap(),
            };
            for rpc in &rpcs {
                let got = match rpc.as_str() {
                    "Hello" => hello.err().unwrap_or(Code::Ok),
                    "FindMissing" => c.find(own).await.err().unwrap_or(Code::Ok),
                    "PutChunks" => c.put(b"another").await.err().unwrap_or(Code::Ok),
                    "GetChunks" => c.get(own).await.err().unwrap_or(Code::Ok),
                    "CommitSnapshot" => c.commit("/data").await.err().unwrap_or(Code::Ok),
                    "ListSnapshots" => match c.list(true).await {
                        Ok(l) if l.iter().any(|s| s.id == alices) => Code::Ok,
                        Ok(_) => Code::NotFound,
                        Err(e) => e,
                    },
                    "GetSnapshot" => c
                        .client
                        .get_snapshot(c.req(v1::GetSnapshotRequest { id: alices.clone() }))
                        .await
                        .err()
                        .map_or(Code::Ok, |s| s.code()),
                    "OpenSnapshot" => c
                        .client
                        .open_snapshot(c.req(v1::OpenSnapshotRequest { id: alices.clone() }))
                        .await
                        .err()
                        .map_or(Code::Ok, |s| s.code()),
                    "DeleteSnapshot" => {
                        let victim = alice.commit("/home/alice").await.unwrap();
                        c.client
                            .delete_snapshot(c.req(v1::DeleteSnapshotRequest {
                                id: victim,
                                delete_passphrase: String::new(),
                            }))
                            .await
                            .err()
                            .map_or(Code::Ok, |s| s.code())
                    }
                    "ChangePassword" => Code::Ok, // below, last: it ends the role's sessions
                    "Refresh" => c
                        .client
                        .refresh(c.req(v1::RefreshRequest {}))
                        .await
                        .err()
                        .map_or(Code::Ok, |s| s.code()),
                    "ServerStatus" => c
                        .client
                        .server_status(c.req(v1::ServerStatusRequest {}))
                        .await
                        .err()
                        .map_or(Code::Ok, |s| s.code()),
                    "EndSession" => {
                        let got = c
                            .client
                            .end_session(c.req(v1::EndSessionRequest {}))
                            .await
                            .err()
                            .map_or(Code::Ok, |s| s.code());
                        if got == Code::Ok {
                            // The token is dead at once; log in again for ChangePassword.
                            assert_eq!(c.list(false).await.err(), Some(Code::Unauthenticated));
                            c.hello(identity, password).await.unwrap();
                        }
                        got
                    }
                    "GetPolicy" => c
                        .client
                        .get_policy(c.req(v1::GetPolicyRequest {
                            path: "/home/me".into(),
                        }))
                        .await
                        .err()
                        .map_or(Code::Ok, |s| s.code()),
                    "ProtectSnapshot" => c
                        .client
                        .protect_snapshot(c.req(v1::ProtectSnapshotRequest {
                            id: alices.clone(),
                            protect: true,
                            ..Default::default()
                        }))
                        .await
                        .err()
                        .map_or(Code::Ok, |s| s.code()),
                    "LockSnapshot" => {
                        let victim = alice.commit("/home/alice").await.unwrap();
                        c.client
                            .lock_snapshot(c.req(v1::LockSnapshotRequest {
                                id: victim,
                                until_us: coffer_proto::now_us() + 3_600_000_000,
                            }))
                            .await
                            .err()
                            .map_or(Code::Ok, |s| s.code())
                    }
                    "SetPolicy" => c
                        .client
                        .set_policy(c.req(v1::SetPolicyRequest {
                            target: "alice@laptop".into(),
                            policy_json: r#"{"keep_daily": 5}"#.into(),
                            ..Default::default()
                        }))
                        .await
                        .err()
                        .map_or(Code::Ok, |s| s.code()),
                    "AddRule" => c
                        .client
                        .add_rule(c.req(v1::AddRuleRequest {
                            user: "*@*".into(),
                            access: "FULL".into(),
                            target: "type=snapshot".into(),
                            delete_passphrase: String::new(),
                        }))
                        .await
                        .err()
                        .map_or(Code::Ok, |s| s.code()),
                    "CreateEnrollment" => c
                        .client
                        .create_enrollment(c.req(v1::CreateEnrollmentRequest {
                            identity: "newcomer@host".into(),
                            auth_hash: vec![7u8; 32].into(),
                            expires_us: coffer_proto::now_us() + 3_600_000_000,
                            ..Default::default()
                        }))
                        .await
                        .err()
                        .map_or(Code::Ok, |s| s.code()),
                    "Enroll" => c
                        .client
                        .enroll(c.req(v1::EnrollRequest {
                            protocol_version: coffer_proto::PROTOCOL_VERSION,
                            identity: "newcomer@host".into(),
                            auth: vec![1u8; 16].into(),
                            password: "short".into(),
                        }))
                        .await
                        .err()
                        .map_or(Code::Ok, |s| s.code()),
                    other => panic!("no probe for RPC {other}: add it to this test"),
                };
                if rpc != "ChangePassword" && got != expected[rpc.as_str()][col] {
                    failures.push(format!(
                        "{rpc} as {role}: got {got:?}, expected {:?}",
                        expected[rpc.as_str()][col]
                    ));
                }
            }
            // ChangePassword last (to the same password: the sessions still end).
            let got = c
                .client
                .change_password(c.req(v1::ChangePasswordRequest {
                    new_password: password.to_string(),
                }))
                .await
                .err()
                .map_or(Code::Ok, |s| s.code());
            if got != expected["ChangePassword"][col] {
                failures.push(format!(
                    "ChangePassword as {role}: got {got:?}, expected {:?}",
                    expected["ChangePassword"][col]
                ));
            }
            if got == Code::Ok {
                assert_eq!(
                    c.list(false).await.err(),
                    Some(Code::Unauthenticated),
                    "a password change ends the sessions of {role}"
                );
            }
        }
        assert!(
            failures.is_empty(),
            "access matrix:\n{}",
            failures.join("\n")
        );

        // Malformed identities: refused at login and at creation.
        let mut c = Raw::connect(&app).await;
        for bad in ["alice", "a/b@h", "../x@h", "a@h\0", "A B@h"] {
            assert_eq!(
                c.hello(bad, "whatever-long").await,
                Err(Code::InvalidArgument)
            );
        }
    });
    for bad in ["alice", "a/b@h", "x@..", "a..b@h", ".a@h"] {
        let (ok, out) = admin(&app, &["user", "add", bad]);
        assert!(!ok && out.contains("invalid identity"), "{bad}: {out}");
    }
}

/// Account and rule changes on a running appliance are in force within a second; the
/// catalog only ever holds argon2id hashes; SIGHUP and `refresh` reload without stopping it.
#[test]
#[allow(clippy::too_many_lines)] // one operator session, step by step, against one appliance
fn changes_on_a_running_appliance_apply_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = Appliance::init(dir.path(), 1, 64 << 10, &["alice@laptop"]).unwrap();
    let (ok, out) = admin(&app, &["refresh"]);
    assert!(!ok && out.contains("no appliance is serving"), "{out}");
    app.start().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut alice = Raw::connect(&app).await;
        alice.hello("alice@laptop", USER_PASSWORD).await.unwrap();
        let snap = alice.commit("/home/alice").await.unwrap();

        // A new account can log in as soon as `user add` returns.
        let t = Instant::now();
        let (ok, out) = admin(&app, &["user", "add", "bob@laptop"]);
        assert!(ok && out.contains("in force now"), "{out}");
        let mut bob = Raw::connect(&app).await;
        bob.hello("bob@laptop", USER_PASSWORD).await.unwrap();
        let took = t.elapsed();
        eprintln!("user add -> first login: {took:?}");
        assert!(
            took < Duration::from_secs(1),
            "user add took {took:?} to apply"
        );
        assert!(
            bob.list(true).await.unwrap().is_empty(),
            "bob sees nothing of alice"
        );

        // A rule: bob may read alice's snapshots.
        let (ok, out) = admin(
            &app,
            &[
                "acl",
                "add",
                "--user",
                "bob@*",
                "--access",
                "READ",
                "--target",
                "type=snapshot,username=alice",
            ],
        );
        assert!(
            !ok && out.contains("acl enable"),
            "adding before enabling is refused: {out}"
        );
        let t = Instant::now();
        assert!(admin(&app, &["acl", "enable"]).0);
        let (ok, out) = admin(
            &app,
            &[
                "acl",
                "add",
                "--user",
                "bob@*",
                "--access",
                "READ",
                "--target",
                "type=snapshot,username=alice",
            ],
        );
        assert!(ok, "{out}");
        let seen = bob.list(true).await.unwrap();
        let took = t.elapsed();
        assert!(
            seen.iter().any(|s| s.id == snap),
            "bob reads alice's snapshot"
        );
        assert!(
            took < Duration::from_secs(1),
            "acl add took {took:?} to apply"
        );
        let rule_id = out.split_whitespace().next().unwrap().to_string();

        // Removing previews first, then acts.
        let (ok, out) = admin(&app, &["acl", "remove", &rule_id]);
        assert!(
            ok && out.contains("would remove") && out.contains("nothing removed"),
            "{out}"
        );
        assert!(bob.list(true).await.unwrap().iter().any(|s| s.id == snap));
        let (ok, out) = admin(&app, &["acl", "remove", &rule_id, "--delete"]);
        assert!(ok, "{out}");
        assert!(
            bob.list(true).await.unwrap().is_empty(),
            "rule removed: invisible again"
        );
        let (ok, out) = admin(&app, &["acl", "remove", "--all"]);
        assert!(ok && out.contains("would remove"), "{out}");
        let (ok, _) = admin(&app, &["acl", "list"]);
        assert!(ok);

        // A password change ends bob's session at once; the new password works.
        let t = Instant::now();
        std::fs::write(dir.path().join("pw"), "a-new-password\n").unwrap();
        let pwfile = dir.path().join("pw");
        let (ok, out) = admin(
            &app,
            &[
                "user",
                "set",
                "bob@laptop",
                "--password-file",
                pwfile.to_str().unwrap(),
            ],
        );
        assert!(ok, "{out}");
        assert_eq!(bob.list(false).await.err(), Some(Code::Unauthenticated));
        let mut again = Raw::connect(&app).await;
        assert_eq!(
            again.hello("bob@laptop", USER_PASSWORD).await,
            Err(Code::Unauthenticated)
        );
        again.hello("bob@laptop", "a-new-password").await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(2));

        // Deleting ends the session and the account.
        let (ok, out) = admin(&app, &["user", "delete", "bob@laptop"]);
        assert!(ok, "{out}");
        assert_eq!(again.list(false).await.err(), Some(Code::Unauthenticated));
        let (ok, out) = admin(&app, &["user", "list"]);
        assert!(
            ok && out.contains("alice@laptop") && !out.contains("bob@"),
            "{out}"
        );
        assert!(!out.contains("argon2"), "list never shows secrets: {out}");

        // SIGHUP and refresh reload; the appliance keeps serving (SIGHUP's default would kill it).
        let pid = app.pid().unwrap().to_string();
        assert!(std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success());
        let (ok, out) = admin(&app, &["refresh"]);
        assert!(ok && out.contains("refreshed"), "{out}");
        assert!(app.running(), "the appliance survived SIGHUP");
        let mut a2 = Raw::connect(&app).await;
        a2.hello("alice@laptop", USER_PASSWORD).await.unwrap();
        assert_eq!(a2.list(false).await.unwrap().len(), 1);
    });
    assert_eq!(app.stop().unwrap(), Some(0));
    // Offline, the same commands work on the catalog directly; only argon2id PHC strings are kept.
    let (ok, out) = admin(&app, &["user", "add", "carol@desk"]);
    assert!(ok && out.contains("written to the catalog"), "{out}");
    let catalog = std::fs::read_dir(app.repo.join("catalog")).unwrap();
    let mut text = Vec::new();
    for f in catalog.flatten() {
        text.extend(std::fs::read(f.path()).unwrap_or_default());
    }
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("$argon2id$v=19$m=19456,t=2,p=1$"));
    assert!(
        !text.contains(USER_PASSWORD),
        "a password in clear text in the catalog"
    );
}
