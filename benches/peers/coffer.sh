# coffer's tool block for ../shared/bench/run.sh (pass it with EXTRA_TOOLS=benches/peers/coffer.sh).
# The appliance runs on 127.0.0.1 with TLS, 2 shards, started in coffer_start and stopped in
# coffer_stop; the client is the `coffer` binary. Build first: cargo build --release --bins.
COFFER_BIN=${COFFER_BIN:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/target/release}
export COFFER_BIN
coffer_version() { "$COFFER_BIN/coffer" --version; }
coffer_env() {
    export COFFER_REPO_PASSWORD=$BENCH_PASSWORD COFFER_USER_PASSWORD=$BENCH_PASSWORD COFFER_PASSWORD=$BENCH_PASSWORD
    export COFFER_CONFIG="$CACHE/client.json" XDG_CACHE_HOME="$CACHE/xdg"
}
coffer_repo_dir() { echo "$REPO"; }
coffer_start() {
    coffer_env
    rm -rf "$REPO"
    # shellcheck disable=SC2086 # COFFER_INIT_EXTRA is a list of arguments (coffer-s3.sh)
    "$COFFER_BIN/coffer-appliance" init --repo "$REPO" ${COFFER_INIT_EXTRA:-} > "$LOGDIR/coffer-init.log" 2>&1
    "$COFFER_BIN/coffer-appliance" user add bench@bench --repo "$REPO" >> "$LOGDIR/coffer-init.log" 2>&1
    rm -f "$WORK/coffer-cert.pem" "$WORK/coffer-key.pem" "$WORK/coffer-serve.out"
    COFFER_LOG="warn,glommio::reactor=off" "$COFFER_BIN/coffer-appliance" serve --repo "$REPO" --listen 127.0.0.1:0 --tls-generate-cert \
        --tls-cert-file "$WORK/coffer-cert.pem" --tls-key-file "$WORK/coffer-key.pem" ${COFFER_SERVE_EXTRA:-} \
        > "$WORK/coffer-serve.out" 2> "$LOGDIR/coffer-serve.log" &
    COFFER_PID=$!
    local i; for i in $(seq 100); do grep -q '^LISTENING ON:' "$WORK/coffer-serve.out" 2>/dev/null && break; sleep 0.1; done
}
coffer_stop() { [ -n "${COFFER_PID:-}" ] && kill "$COFFER_PID" 2>/dev/null; wait "$COFFER_PID" 2>/dev/null; COFFER_PID=; }
coffer_server_pid() { echo "${COFFER_PID:-}"; }
coffer_init() {
    coffer_env
    "$COFFER_BIN/coffer" connect server --url "https://$(sed -n 's/^LISTENING ON: //p' "$WORK/coffer-serve.out")" \
        --server-cert-fingerprint "$(sed -n 's/^SERVER CERT SHA256: //p' "$WORK/coffer-serve.out")" \
        --override-username bench --override-hostname bench
}
coffer_backup() { coffer_env; "$COFFER_BIN/coffer" snapshot create "$SRC"; }
# S4 restores the S1 snapshot: the oldest one of the path.
coffer_restore() {
    coffer_env
    local id; id=$("$COFFER_BIN/coffer" snapshot list --json "$SRC" | head -1 | sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p')
    "$COFFER_BIN/coffer" restore "$id" "$DEST"
}
coffer_restored_root() { echo "$DEST"; }
