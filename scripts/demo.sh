#!/usr/bin/env bash
# The demo. Starts a step-runner daemon, runs a step file in it and follows its output; kills
# the client halfway (SIGKILL, like a dropped laptop lid or SSH session), starts it again, and
# shows that it continues exactly where it stopped: the two halves together are byte for byte
# the job's log.
#
#   bash scripts/demo.sh [STEP_FILE]     (default: an embedded build-and-test step file)
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "installing packages and building (first run takes a few minutes)"
bash scripts/build.sh
SR="$PWD/${BUILD_DIR:-build}/step-runner/step-runner"

WORK=$(mktemp -d /tmp/step-runner-demo.XXXXXX)
DAEMON=""
cleanup() {
  if [ -n "$DAEMON" ] && kill -0 "$DAEMON" 2>/dev/null; then
    kill -TERM "$DAEMON"; wait "$DAEMON" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
export STEP_RUNNER_SOCKET="$WORK/step-runner.sock"
export XDG_STATE_HOME="$WORK/client-state"

STEPS="${1:-$WORK/demo.yml}"
if [ -z "${1:-}" ]; then
  cat > "$STEPS" <<'YAML'
spec: {}
---
run:
  - name: prepare
    script: |
      echo "preparing the workspace in $PWD"
      printf 'print("hello from the agent")\n' > main.py
  - name: build
    script: |
      for i in $(seq 1 12); do echo "[build] compiling unit $i/12"; sleep 0.2; done
  - name: test
    script: |
      for i in $(seq 1 12); do echo "[test] case $i passed"; sleep 0.2; done
      echo "warnings go to stderr" >&2
      echo "all 12 tests passed"
YAML
fi

say "starting the daemon: step-runner serve --socket $STEP_RUNNER_SOCKET"
"$SR" serve --socket "$STEP_RUNNER_SOCKET" --state-dir "$WORK/state" --log-level warning 2> "$WORK/daemon.log" &
DAEMON=$!
for _ in $(seq 1 200); do
  grep -q "listening on socket" "$WORK/daemon.log" 2>/dev/null && break
  sleep 0.05
done
grep -q "listening on socket" "$WORK/daemon.log" || { cat "$WORK/daemon.log"; echo "the daemon did not start" >&2; exit 1; }
cat "$WORK/daemon.log"

ID="demo-$(date +%s)"
say "running $(basename "$STEPS") as job $ID and following its output"
: > "$WORK/part1"
"$SR" run "$STEPS" --id "$ID" --follow > "$WORK/part1" 2> "$WORK/client1.log" &
CLIENT=$!
tail -n +1 -f --pid="$CLIENT" "$WORK/part1" &
TAIL=$!
sleep 2.5
{ kill -KILL "$CLIENT"; wait "$CLIENT"; } 2>/dev/null || true
sleep 0.3; kill "$TAIL" 2>/dev/null || true; wait "$TAIL" 2>/dev/null || true

say "the client was killed after $(stat -c %s "$WORK/part1") bytes; the job keeps running in the daemon"
"$SR" status "$ID" || true

sleep 1
say "starting the client again: step-runner logs $ID --follow"
set +e
"$SR" logs "$ID" --follow | tee "$WORK/part2"
code=${PIPESTATUS[0]}
set -e
echo "(client exit code $code: the job's outcome)"

say "checking: what the two clients printed, together, against the job's whole log"
"$SR" logs "$ID" > "$WORK/full"
if cat "$WORK/part1" "$WORK/part2" | cmp -s - "$WORK/full"; then
  echo "byte for byte identical: $(stat -c %s "$WORK/full") bytes, none repeated, none missing"
else
  echo "MISMATCH between the clients' output and the log" >&2
  exit 1
fi

say "every job the daemon knows: step-runner status"
"$SR" status
exit "$code"
