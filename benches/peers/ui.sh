# coffer with the web UI and the metrics endpoint on (`serve --ui-listen`, `--metrics-listen`),
# for ../shared/bench/run.sh (EXTRA_TOOLS="benches/peers/coffer.sh benches/peers/ui.sh",
# TOOLS="coffer ui"): the same appliance, repository and client as coffer.sh. Measured beside
# `coffer` in one run, it shows what serving the UI and metrics costs a backup.
ui_version() { echo "$("$COFFER_BIN/coffer" --version) ui+metrics"; }
ui_repo_dir() { coffer_repo_dir; }
ui_start() { COFFER_SERVE_EXTRA="--ui-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0" coffer_start; }
ui_stop() { coffer_stop; }
ui_server_pid() { coffer_server_pid; }
ui_init() { coffer_init; }
ui_backup() { coffer_backup; }
ui_restore() { coffer_restore; }
ui_restored_root() { coffer_restored_root; }
