#!/bin/bash
# S1 (the Linux tree from ../shared/bench, fresh repository, cold cache) with the appliance plain,
# with --ui-listen, and with --metrics-listen, alternating (ORDER, default "plain ui metrics"), ROUNDS rounds (default 4): what serving the web UI or
# the metrics costs a backup. Needs root (drop_caches) and a release build. Usage: bash benches/ui-ab.sh
B=${COFFER_BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
export COFFER_REPO_PASSWORD=benchpw123 COFFER_USER_PASSWORD=benchpw123 COFFER_PASSWORD=benchpw123
W=/var/tmp/ab; mkdir -p $W
one() {
  local tag=$1; shift
  rm -rf $W/repo $W/client.json $W/xdg $W/out $W/c.pem $W/k.pem; sync; echo 3 > /proc/sys/vm/drop_caches
  $B/coffer-appliance init --repo $W/repo >/dev/null 2>&1
  $B/coffer-appliance user add bench@bench --repo $W/repo >/dev/null 2>&1
  COFFER_LOG=warn $B/coffer-appliance serve --repo $W/repo --listen 127.0.0.1:0 --tls-generate-cert --tls-cert-file $W/c.pem --tls-key-file $W/k.pem "$@" > $W/out 2>/dev/null &
  local pid=$!
  for i in $(seq 100); do grep -q LISTENING $W/out && break; sleep 0.1; done
  XDG_CACHE_HOME=$W/xdg $B/coffer --config $W/client.json connect server --url https://$(sed -n 's/^LISTENING ON: //p' $W/out) --server-cert-fingerprint $(sed -n 's/^SERVER CERT SHA256: //p' $W/out) --override-username bench --override-hostname bench >/dev/null
  local s=$(date +%s.%N)
  XDG_CACHE_HOME=$W/xdg $B/coffer --config $W/client.json snapshot create ${SRC:-/var/tmp/bench-data/linux} >/dev/null 2>&1
  local e=$(date +%s.%N)
  local st=$(awk '{print $14+$15}' /proc/$pid/stat)
  kill $pid; wait $pid 2>/dev/null
  echo "$tag wall=$(echo "$e - $s" | bc) server_ticks=$st"
}
# ORDER sets which configurations run, in which order within a round.
for r in $(seq "${ROUNDS:-4}"); do
  for mode in ${ORDER:-plain ui metrics}; do
    case $mode in
      plain) one plain ;;
      ui) one ui --ui-listen 127.0.0.1:0 ;;
      metrics) one metrics --metrics-listen 127.0.0.1:0 ;;
    esac
  done
done
