# coffer with its packs in a Garage bucket on loopback (issue 17), for ../shared/bench/run.sh:
#   coffer_s3   --ack-after local, default cache: S4 reads what the local cache still holds
#   coffer_s3r  --ack-after remote: a chunk is acknowledged once Garage confirmed its pack
#   coffer_s3c  --cache-size 0: every pack leaves the local disk once uploaded, S4 reads every
#               chunk with a ranged GET; its S1/S5 include `maintenance run`, which seals the
#               open packs and waits until every pack is in the bucket
# Source it after coffer.sh: EXTRA_TOOLS="benches/peers/coffer.sh benches/peers/coffer-s3.sh".
# Each start makes a fresh bucket; coffer_s3*_stop appends the bucket's object count and bytes to
# $LOGDIR/coffer-s3-objects.csv (listed through the S3 API with boto3).
GARAGE=${GARAGE:-/var/tmp/coffer-ci-garage/bin/garage}
GARAGE_DIR=${GARAGE_DIR:-/var/tmp/bench-work/garage}

garage_cli() { "$GARAGE" -c "$GARAGE_DIR/garage.toml" "$@"; }

garage_up() {
    if [ -f "$GARAGE_DIR/pid" ] && kill -0 "$(cat "$GARAGE_DIR/pid")" 2>/dev/null; then return 0; fi
    rm -rf "$GARAGE_DIR"; mkdir -p "$GARAGE_DIR"
    cat > "$GARAGE_DIR/garage.toml" <<EOF
metadata_dir = "$GARAGE_DIR/meta"
data_dir = "$GARAGE_DIR/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:3901"
rpc_public_addr = "127.0.0.1:3901"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:3900"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:3903"
EOF
    RUST_LOG=garage=warn "$GARAGE" -c "$GARAGE_DIR/garage.toml" server > "$GARAGE_DIR/log" 2>&1 &
    echo $! > "$GARAGE_DIR/pid"
    local i id; for i in $(seq 100); do id=$(garage_cli node id -q 2>/dev/null) && break; sleep 0.1; done
    garage_cli layout assign -z dc1 -c 100G "${id%%@*}" > /dev/null
    garage_cli layout apply --version 1 > /dev/null
    garage_cli key create bench > "$GARAGE_DIR/key.txt"
    printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' \
        "$(sed -n 's/^Key ID: *//p' "$GARAGE_DIR/key.txt")" \
        "$(sed -n 's/^Secret key: *//p' "$GARAGE_DIR/key.txt")" > "$GARAGE_DIR/credentials"
}

coffer_s3_bucket() {
    GARAGE_BUCKET=bench-$(date +%s%N | tail -c 9)
    garage_cli bucket create "$GARAGE_BUCKET" > /dev/null
    garage_cli bucket allow --read --write --owner "$GARAGE_BUCKET" --key bench > /dev/null
    export COFFER_INIT_EXTRA="--storage s3://$GARAGE_BUCKET/repo --s3-endpoint http://127.0.0.1:3900 --s3-region garage --s3-credentials-file $GARAGE_DIR/credentials"
}

coffer_s3_objects() {
    python3 - "$GARAGE_BUCKET" "$GARAGE_DIR/credentials" "$1" >> "$LOGDIR/coffer-s3-objects.csv" <<'EOF'
import configparser, sys, boto3
bucket, creds, tool = sys.argv[1:4]
c = configparser.ConfigParser(); c.read(creds)
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:3900", region_name="garage",
                  aws_access_key_id=c["default"]["aws_access_key_id"],
                  aws_secret_access_key=c["default"]["aws_secret_access_key"])
n = size = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="repo/packs/"):
    for o in page.get("Contents", []):
        n += 1; size += o["Size"]
print(f"{tool},{bucket},{n},{size},{size / max(n, 1):.0f},{n / max(size / 1e9, 1e-9):.1f}")
EOF
}

coffer_s3c_backup() { coffer_backup && "$COFFER_BIN/coffer-appliance" maintenance run --repo "$REPO" > /dev/null; }
for t in coffer_s3 coffer_s3r coffer_s3c; do
    eval "${t}_version() { coffer_version; echo \"garage \$(\"\$GARAGE\" --version 2>/dev/null | head -1)\"; }"
    eval "${t}_repo_dir() { coffer_repo_dir; }"
    eval "${t}_server_pid() { coffer_server_pid; }"
    eval "${t}_init() { coffer_init; }"
    [ "$t" = coffer_s3c ] || eval "${t}_backup() { coffer_backup; }"
    eval "${t}_restore() { coffer_restore; }"
    eval "${t}_restored_root() { coffer_restored_root; }"
    eval "${t}_stop() { coffer_stop; coffer_s3_objects $t; unset COFFER_INIT_EXTRA COFFER_SERVE_EXTRA; }"
done
coffer_s3_start() { garage_up; coffer_s3_bucket; export COFFER_SERVE_EXTRA="--ack-after local"; coffer_start; }
coffer_s3r_start() { garage_up; coffer_s3_bucket; export COFFER_SERVE_EXTRA="--ack-after remote"; coffer_start; }
coffer_s3c_start() { garage_up; coffer_s3_bucket; export COFFER_SERVE_EXTRA="--cache-size 0"; coffer_start; }
