#!/usr/bin/env bash
# Desktop smoke test: starts the Tauri app on an X display (CI runs it under Xvfb), waits for its
# in-process server and its window, screenshots the screen and checks the UI is drawn, then checks
# that a second launch hands over to the first and exits.
#
#   xvfb-run -a -s "-screen 0 1280x800x24" bash tests/desktop/smoke.sh target/debug/local-diffusers-desktop
#
# Needs: xdotool, ImageMagick (import, convert), curl, dbus-daemon (with GTK). Writes
# tests/out/desktop.png, tests/out/desktop-error.png and tests/out/desktop-app.log.
set -euo pipefail

APP=${1:?usage: smoke.sh PATH/TO/local-diffusers-desktop}
OUT=tests/out
SHOT=$OUT/desktop.png
LOG=$OUT/desktop-app.log
# The smallest number of distinct colours a drawn UI has; a blank or single-colour screen has 1-2.
MIN_COLOURS=${MIN_COLOURS:-64}

fail() { echo "desktop smoke: FAIL: $*" >&2; exit 1; }
say() { echo "desktop smoke: $*"; }
# kill -0 also succeeds on a zombie (a child that exited but was not waited for).
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }  # the fields after "(comm) "; the first is the state
  [[ $stat != Z* ]]
}

[ -x "$APP" ] || fail "$APP is not an executable (build it: cargo build -p local-diffusers-desktop)"
[ -n "${DISPLAY:-}" ] || fail "no DISPLAY; run under xvfb-run"
for tool in xdotool import convert curl dbus-daemon; do
  command -v "$tool" >/dev/null || fail "missing tool: $tool"
done
APP=$(realpath "$APP")
mkdir -p "$OUT"
rm -f "$SHOT" "$LOG"

DATA=$(mktemp -d)
STDOUT=$(mktemp)
APP_PID=
BUS_PID=
cleanup() {
  if [ -n "$APP_PID" ] && alive "$APP_PID"; then
    kill "$APP_PID" 2>/dev/null || true
    for _ in $(seq 50); do alive "$APP_PID" || break; sleep 0.1; done
    kill -9 "$APP_PID" 2>/dev/null || true
  fi
  [ -n "$BUS_PID" ] && kill "$BUS_PID" 2>/dev/null || true
  rm -rf "$DATA" "$STDOUT"
}
trap cleanup EXIT

# Single instance works over the D-Bus session bus. Use a private one, so this test neither finds
# an app the developer has open nor depends on the CI machine having a session.
BUS_INFO=$(dbus-daemon --session --fork --nopidfile --print-address=1 --print-pid=1) \
  || fail "could not start a private D-Bus session bus"
DBUS_SESSION_BUS_ADDRESS=$(sed -n 1p <<<"$BUS_INFO")
BUS_PID=$(sed -n 2p <<<"$BUS_INFO")
export DBUS_SESSION_BUS_ADDRESS

"$APP" --data-dir "$DATA" >"$STDOUT" 2>"$LOG" &
APP_PID=$!
say "started app (pid $APP_PID, data $DATA)"

# 1. The in-process server: the app prints "Local Diffusers is running at URL", like the CLI.
URL=
for _ in $(seq 600); do
  URL=$(sed -n 's/^Local Diffusers is running at \(http[^ ]*\)$/\1/p' "$STDOUT" | head -n1)
  [ -n "$URL" ] && break
  alive "$APP_PID" || { cat "$LOG" >&2; fail "the app exited before its server started"; }
  sleep 0.1
done
[ -n "$URL" ] || { cat "$LOG" >&2; fail "no 'Local Diffusers is running at' line within 60 s"; }
say "server at $URL"
case "$URL" in http://127.0.0.1:*) ;; *) fail "server is not on 127.0.0.1: $URL" ;; esac
curl -fsS --max-time 10 -o /dev/null "$URL" || fail "the server at $URL does not answer"

# 2. The window, and the UI inside it. Until the page has rendered, the screen is one colour.
WID=
for _ in $(seq 300); do
  WID=$(xdotool search --onlyvisible --name '^Local Diffusers$' 2>/dev/null | head -n1 || true)
  [ -n "$WID" ] && break
  alive "$APP_PID" || { cat "$LOG" >&2; fail "the app exited before its window appeared"; }
  sleep 0.2
done
[ -n "$WID" ] || { cat "$LOG" >&2; fail "no visible window named 'Local Diffusers' within 60 s"; }
say "window $WID: $(xdotool getwindowgeometry "$WID" | tr '\n' ' ')"

COLOURS=0
for _ in $(seq 30); do
  sleep 1
  import -window root "$SHOT"
  COLOURS=$(convert "$SHOT" -format '%k' info:)
  # Let the page settle one more second once it has drawn, then take the final shot.
  if [ "$COLOURS" -ge "$MIN_COLOURS" ]; then
    sleep 1
    import -window root "$SHOT"
    COLOURS=$(convert "$SHOT" -format '%k' info:)
    break
  fi
done
[ "$COLOURS" -ge "$MIN_COLOURS" ] \
  || fail "the screenshot $SHOT has $COLOURS colours (< $MIN_COLOURS): the window looks blank"
say "screenshot $SHOT has $COLOURS colours"

# 3. Single instance: a second launch hands over to the first and exits without a second window.
SECOND_START=$(date +%s)
timeout 15 "$APP" --data-dir "$DATA" >>"$LOG" 2>&1 || fail "the second launch failed or hung (exit $?)"
SECOND_TIME=$(( $(date +%s) - SECOND_START ))
[ "$SECOND_TIME" -le 10 ] || fail "the second launch took ${SECOND_TIME} s to exit"
alive "$APP_PID" || fail "the first app exited when the second was launched"
sleep 1
WINDOWS=$(xdotool search --onlyvisible --name '^Local Diffusers$' 2>/dev/null | wc -l)
[ "$WINDOWS" -eq 1 ] || fail "expected 1 'Local Diffusers' window after a second launch, found $WINDOWS"
say "second launch exited in ${SECOND_TIME} s; still one window"
curl -fsS --max-time 10 -o /dev/null "$URL" || fail "the server stopped answering after the second launch"

# 4. Closing: SIGTERM ends the app (cleanup would kill -9 one that hangs).
kill "$APP_PID"
for _ in $(seq 100); do alive "$APP_PID" || break; sleep 0.1; done
if alive "$APP_PID"; then fail "the app did not exit within 10 s of SIGTERM"; fi
APP_PID=

# 5. A server that cannot start (the data folder is a file) shows an error window, not a panic.
BROKEN="$DATA/not-a-folder"
: >"$BROKEN"
: >"$STDOUT"
"$APP" --data-dir "$BROKEN" >"$STDOUT" 2>>"$LOG" &
APP_PID=$!
EWID=
for _ in $(seq 150); do
  EWID=$(xdotool search --onlyvisible --name '^Local Diffusers could not start$' 2>/dev/null | head -n1 || true)
  [ -n "$EWID" ] && break
  alive "$APP_PID" || { tail -n 20 "$LOG" >&2; fail "the app exited instead of showing its start-up error"; }
  sleep 0.2
done
[ -n "$EWID" ] || fail "no 'could not start' window within 30 s when the data folder is unusable"
sleep 2
import -window root "$OUT/desktop-error.png"
! grep -q "running at" "$STDOUT" || fail "the app claims to be running with an unusable data folder"
grep -q "not-a-folder" "$LOG" || fail "the log does not say which data folder failed"
say "an unusable data folder shows an error window ($OUT/desktop-error.png)"
kill "$APP_PID"
for _ in $(seq 100); do alive "$APP_PID" || break; sleep 0.1; done
if alive "$APP_PID"; then fail "the app did not exit within 10 s of SIGTERM"; fi
APP_PID=

say "OK"
