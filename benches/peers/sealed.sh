# coffer in sealed mode, for ../shared/bench/run.sh (EXTRA_TOOLS="benches/peers/coffer.sh
# benches/peers/sealed.sh", TOOLS="coffer sealed"): the same appliance and client as coffer.sh,
# with a repository made by `init --mode sealed` and the client holding a read-write keyring
# member. Measured beside `coffer` in one run, it gives the cost of client-side encryption.
sealed_version() { echo "$("$COFFER_BIN/coffer" --version) sealed"; }
sealed_repo_dir() { echo "$REPO"; }
sealed_start() {
    coffer_env
    export COFFER_KEYRING_PASSPHRASE="$BENCH_PASSWORD-keyring"
    rm -rf "$REPO" "$CACHE/keyring.master" "$CACHE/bench.keys"
    "$COFFER_BIN/coffer-appliance" init --mode sealed --repo "$REPO" > "$LOGDIR/sealed-init.log" 2>&1
    "$COFFER_BIN/coffer-appliance" user add bench@bench --repo "$REPO" >> "$LOGDIR/sealed-init.log" 2>&1
    "$COFFER_BIN/coffer" keyring create --out "$CACHE/keyring.master" >> "$LOGDIR/sealed-init.log" 2>&1
    "$COFFER_BIN/coffer" keyring add-member --master "$CACHE/keyring.master" --member bench@bench \
        --out "$CACHE/bench.keys" >> "$LOGDIR/sealed-init.log" 2>&1
    rm -f "$WORK/coffer-cert.pem" "$WORK/coffer-key.pem" "$WORK/coffer-serve.out"
    COFFER_LOG="warn,glommio::reactor=off" "$COFFER_BIN/coffer-appliance" serve --repo "$REPO" --listen 127.0.0.1:0 --tls-generate-cert \
        --tls-cert-file "$WORK/coffer-cert.pem" --tls-key-file "$WORK/coffer-key.pem" \
        > "$WORK/coffer-serve.out" 2> "$LOGDIR/sealed-serve.log" &
    COFFER_PID=$!
    local i; for i in $(seq 100); do grep -q '^LISTENING ON:' "$WORK/coffer-serve.out" 2>/dev/null && break; sleep 0.1; done
}
sealed_stop() { coffer_stop; }
sealed_server_pid() { coffer_server_pid; }
sealed_init() {
    coffer_env
    "$COFFER_BIN/coffer" connect server --url "https://$(sed -n 's/^LISTENING ON: //p' "$WORK/coffer-serve.out")" \
        --server-cert-fingerprint "$(sed -n 's/^SERVER CERT SHA256: //p' "$WORK/coffer-serve.out")" \
        --override-username bench --override-hostname bench --keyring "$CACHE/bench.keys"
}
sealed_backup() { coffer_backup; }
sealed_restore() { coffer_restore; }
sealed_restored_root() { coffer_restored_root; }
