#!/usr/bin/env bash
# Runs coffer and its peers on the same datasets in one go (../shared/bench/run.sh, cold cache
# before every timed run), then writes the comparison table into docs/PERFORMANCE.md between the
# PEERS markers.
#
#   apt-get install -y restic borgbackup rclone linux-source-6.1   # peers and data (once)
#   bash benches/peers/run.sh                                        # REPS=1 TOOLS="..." to narrow
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BENCH=${BENCH:-$ROOT/../shared/bench}
export TOOLS=${TOOLS:-"coffer restic restic_rest borg rustic bupstash"}
export REPS=${REPS:-3}
export OUTDIR=${OUTDIR:-/var/tmp/bench-work/coffer-peers-$(date -u +%Y%m%dT%H%M%S)}
(cd "$ROOT" && cargo build --release --bins)
bash "$BENCH/run.sh" prepare
EXTRA_TOOLS="$HERE/coffer.sh" bash "$BENCH/run.sh" bench
python3 "$HERE/table.py" "$OUTDIR"/results-*.csv > "$OUTDIR/table.md"
python3 - "$ROOT/docs/PERFORMANCE.md" "$OUTDIR/table.md" <<'PY'
import sys
doc, table = sys.argv[1], open(sys.argv[2]).read()
text = open(doc).read()
start, end = "<!-- PEERS START -->", "<!-- PEERS END -->"
i, j = text.index(start) + len(start), text.index(end)
open(doc, "w").write(text[:i] + "\n" + table + text[j:])
PY
echo "table written to docs/PERFORMANCE.md (raw results in $OUTDIR)"
