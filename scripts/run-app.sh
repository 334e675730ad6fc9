#!/usr/bin/env bash
# Installs what is needed, builds, and starts Local Diffusers: the desktop window when a display is
# available, otherwise the headless server (open the printed address in a browser).
# Extra arguments go to the app, e.g. `bash scripts/run-app.sh --data-dir ~/ld-data`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup-deps.sh"
cd "$ROOT"
install_system_packages
build_ui
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then
  echo "==> Building and starting the desktop app (first build takes several minutes)"
  exec cargo run --release --locked -p local-diffusers-desktop --features custom-protocol -- "$@"
else
  echo "==> No display found: starting the server; open the address it prints in your browser"
  exec cargo run --release --locked -p ld-server --bin local-diffusers -- serve "$@"
fi
