#!/usr/bin/env bash
# Installs what building and testing Local Diffusers needs: system packages (Debian/Ubuntu via
# apt), the Rust toolchain check, and the UI's npm modules. Sourced by run-app.sh and test-all.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Tauri 2 on Linux (webkit2gtk 4.1), the headless desktop test (Xvfb, ImageMagick, xdotool) and
# the browser test (Chromium). Measured list: see TAURI.md in the design notes.
APT_PACKAGES=(
  libwebkit2gtk-4.1-dev libgtk-3-dev librsvg2-dev libayatana-appindicator3-dev libssl-dev
  libsoup-3.0-dev libjavascriptcoregtk-4.1-dev libxdo-dev patchelf build-essential pkg-config
  xvfb xauth imagemagick xdotool dbus curl chromium
)

install_system_packages() {
  if command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
      echo "==> Installing system packages: ${missing[*]}"
      local sudo=""
      [ "$(id -u)" -ne 0 ] && sudo="sudo"
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
  else
    echo "==> Not a Debian/Ubuntu system: install by hand the equivalents of:"
    echo "    ${APT_PACKAGES[*]}"
    echo "    (Fedora: webkit2gtk4.1-devel gtk3-devel xorg-x11-server-Xvfb chromium; macOS: Xcode tools only)"
  fi
  for tool in cargo node npm; do
    command -v "$tool" >/dev/null 2>&1 || {
      echo "error: '$tool' is not installed. Install Rust from https://rustup.rs and Node.js 20+ from https://nodejs.org, then run this again." >&2
      exit 1
    }
  done
}

build_ui() {
  echo "==> Installing UI modules and building the UI"
  npm ci --prefix "$ROOT/ui" --no-audit --no-fund --loglevel=error
  npm run --prefix "$ROOT/ui" build
}
