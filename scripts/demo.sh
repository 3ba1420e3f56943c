#!/usr/bin/env bash
# The demo: an issue becomes a merge request, on one machine, through a step-runner daemon.
#
# Starts the local forge (tests/forge: a GitLab API subset, git over HTTP and a fake model) and a
# step-runner daemon with the steps catalog, then dispatches the issue-to-MR workflow for an issue
# (clone, branch, generate a change with the model, run the tests, fix, commit, push, open the MR,
# comment on the issue) and follows its output. Halfway, the client is killed (SIGKILL, like a
# dropped laptop lid or SSH session) and started again: it continues exactly where it stopped, and
# the two halves together are byte for byte the job's log. Then it shows the merge request, its
# diff and the comment, and checks that the forge token is in no log and no file.
#
#   bash scripts/demo.sh [ISSUE]     (default 2: its first diff breaks a test, the fix round repairs it)
#
# Environment: BUILD_DIR (default build); DEMO_SANDBOX=none to run the steps unsandboxed.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
ISSUE="${1:-2}"
PROJECT=demo/calculator

say "installing packages and building (first run takes a few minutes)"
bash scripts/build.sh
BUILD="$PWD/${BUILD_DIR:-build}"
SR="$BUILD/step-runner/step-runner"

WORK=$(mktemp -d /tmp/step-runner-demo.XXXXXX)
DAEMON=""
FORGE=""
stop() {  # stop PID: SIGTERM, and wait for it
  if [ -n "$1" ] && kill -0 "$1" 2>/dev/null; then
    kill -TERM "$1"; wait "$1" 2>/dev/null || true
  fi
}
cleanup() {
  stop "$DAEMON"
  stop "$FORGE"
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/run"
export STEP_RUNNER_SOCKET="$WORK/run/step-runner.sock"
export XDG_STATE_HOME="$WORK/client-state"
# Waits up to 10 s for FILE to hold TEXT.
wait_for() {
  for _ in $(seq 1 200); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}

# A fresh token for this run: the forge accepts it (its env, never argv), the daemon masks it.
TOKEN="sr-demo-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
export FORGE_TOKEN="$TOKEN"   # for the forge API calls below (python reads it from its env)

say "starting the local forge: sr-forge --state-dir $WORK/forge"
# Its model answers after 1.5 s, as a real one would; the job is then still running when the
# client is killed, whatever the machine's speed.
SR_FORGE_TOKEN="$TOKEN" "$BUILD/tests/forge/sr-forge" --state-dir "$WORK/forge" --model-latency-ms 1500 \
  --ready-file "$WORK/forge.url" > "$WORK/forge.log" 2>&1 &
FORGE=$!
wait_for "$WORK/forge.url" http || { cat "$WORK/forge.log"; echo "the forge did not start" >&2; exit 1; }
FORGE_URL=$(cat "$WORK/forge.url")
export FORGE_URL
FORGE_HOST_PORT=${FORGE_URL#http://}

# GET on the forge's API; prints the JSON. (python3, not curl or jq: setup.sh installs it.)
api() {
  python3 - "$1" <<'PY'
import json, os, sys, urllib.request
request = urllib.request.Request(os.environ["FORGE_URL"] + "/api/v4" + sys.argv[1],
                                 headers={"PRIVATE-TOKEN": os.environ["FORGE_TOKEN"]})
print(json.dumps(json.load(urllib.request.urlopen(request))))
PY
}
# Reads JSON on stdin and prints the Python expression $1 of it (`j` is the document).
field() { python3 -c "import json, sys; j = json.load(sys.stdin); print($1)"; }

echo "forge:   $FORGE_URL (GitLab API v4, git over HTTP, an OpenAI-compatible fake model)"
echo "project: $PROJECT, $(api "/projects/demo%2Fcalculator/repository/branches/main" |
  field '"main at " + j["commit"]["id"][:12] + ": " + j["commit"]["title"]')"
echo "issue:   #$ISSUE $(api "/projects/1/issues/$ISSUE" | field 'j["title"]')"

# The daemon: steps run under bubblewrap, and the only network they can reach is the forge's
# host:port (--network=allow is enforced: a relay into an otherwise empty network namespace).
# The catalog's steps exec sr-catalog, which the daemon's PATH must hold.
SANDBOX_FLAGS=(--network=allow --allow-host "$FORGE_HOST_PORT")
[ "${DEMO_SANDBOX:-bwrap}" = none ] && SANDBOX_FLAGS=(--sandbox=none)
start_daemon() {
  say "starting the daemon: step-runner serve --catalog steps-catalog $*"
  PATH="$BUILD/steps-catalog/helper:$PATH" "$SR" serve --socket "$STEP_RUNNER_SOCKET" \
    --state-dir "$WORK/state" --catalog "$PWD/steps-catalog" --log-level warning "$@" 2> "$WORK/daemon.log" &
  DAEMON=$!
  if wait_for "$WORK/daemon.log" "listening on socket"; then cat "$WORK/daemon.log"; return 0; fi
  cat "$WORK/daemon.log"
  stop "$DAEMON"; DAEMON=""
  return 1
}
if ! start_daemon "${SANDBOX_FLAGS[@]}"; then
  # bwrap cannot make namespaces on this machine (a container without user namespaces): the
  # daemon refused, and named the fixes above. The demo goes on without the sandbox.
  say "the sandbox cannot work here (see above); running the demo's steps unsandboxed"
  start_daemon --sandbox=none || { echo "the daemon did not start" >&2; exit 1; }
fi

# What a gateway or a quick action sends: the catalog's workflow, with the token as a masked job
# variable, so that the daemon masks it in everything the job writes.
STEPS="$WORK/issue-to-mr.yml"
cat > "$STEPS" <<'YAML'
spec:
  inputs:
    forge_url: {type: string}
    project: {type: string}
    issue: {type: number}
---
run:
  - name: issue_to_mr
    step: dist://workflows/issue-to-mr
    inputs:
      forge_url: "${{ inputs.forge_url }}"
      project: "${{ inputs.project }}"
      issue: "${{ inputs.issue }}"
      token: "${{ vars.FORGE_TOKEN }}"
YAML

ID="issue-$ISSUE-$(date +%s)"
RUN=("$SR" run "$STEPS" --input "forge_url=$FORGE_URL" --input "project=$PROJECT" --input "issue=$ISSUE"
     --masked-var "FORGE_TOKEN=$TOKEN")
say "dispatching the issue-to-MR workflow for issue #$ISSUE as job $ID and following its output"
: > "$WORK/part1"
"${RUN[@]}" --id "$ID" --work-dir "$WORK/workspace" --follow > "$WORK/part1" 2> "$WORK/client1.log" &
CLIENT=$!
tail -n +1 -f --pid="$CLIENT" "$WORK/part1" &
TAIL=$!
# Halfway: once the first test round has failed; the fix round (the model again) comes next.
for _ in $(seq 1 1200); do
  grep -q "^test: exit [1-9]" "$WORK/part1" 2>/dev/null && break
  kill -0 "$CLIENT" 2>/dev/null || break
  sleep 0.05
done
if kill -0 "$CLIENT" 2>/dev/null; then
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
else
  # The job ended before the client could be killed (it failed early): nothing to resume.
  set +e; wait "$CLIENT"; code=$?; set -e
  wait "$TAIL" 2>/dev/null || true
  : > "$WORK/part2"
  say "the job ended before the client could be killed"
  cat "$WORK/client1.log"
fi
echo "(client exit code $code: the job's outcome)"

say "checking: what the two clients printed, together, against the job's whole log"
"$SR" logs "$ID" > "$WORK/full"
if cat "$WORK/part1" "$WORK/part2" | cmp -s - "$WORK/full"; then
  echo "byte for byte identical: $(stat -c %s "$WORK/full") bytes, none repeated, none missing"
else
  echo "MISMATCH between the clients' output and the log" >&2
  exit 1
fi
[ "$code" -eq 0 ] || { echo "the workflow failed: see the log above" >&2; exit "$code"; }

say "the steps, as the daemon's audit log recorded them: step-runner audit tail"
# Each step's outcome, its sandbox and the network it was granted (only the steps that talk to
# the forge asked for network, and got exactly the forge's host:port).
"$SR" audit tail --state-dir "$WORK/state" --lines 1000 |
  awk -v id="$ID" '$3 == "step_finished" && index($0, "job=" id " ") {
    f["step"] = f["status"] = f["sandbox"] = f["network"] = "-"
    for (i = 4; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = substr($i, length(kv[1]) + 2) }
    printf "  %-12s %-8s sandbox=%-5s network=%s\n", f["step"], f["status"], f["sandbox"], f["network"] }'

say "the merge request"
api "/projects/1/merge_requests?state=all" | field '"\n".join(
  "!%d %s\n    %s -> %s, %s, draft: %s\n    %s" % (m["iid"], m["title"], m["source_branch"], m["target_branch"],
                                                   m["state"], str(m["draft"]).lower(), m["web_url"]) for m in j)'
MR=$(api "/projects/1/merge_requests?state=all" | field 'j[0]["iid"]')

say "its diff"
api "/projects/1/merge_requests/$MR/changes" | field '"".join(
  "--- a/%s\n+++ b/%s\n%s" % (c["old_path"], c["new_path"], c["diff"]) for c in j["changes"]).rstrip()'

say "the comment on issue #$ISSUE"
api "/projects/1/issues/$ISSUE/notes" | field '"\n".join("@%s: %s" % (n["author"]["username"], n["body"]) for n in j)'

say "dispatching the same workflow again (a retried quick action): nothing changes on the forge"
HEAD_BEFORE=$(api "/projects/1/repository/branches/step-runner%2Fissue-$ISSUE" | field 'j["commit"]["id"][:12]')
set +e
"${RUN[@]}" --id "$ID-again" --work-dir "$WORK/workspace-again" --follow > "$WORK/again.log" 2>&1
again=$?
set -e
echo "second job $ID-again: exit code $again;" \
  "merge requests: $(api "/projects/1/merge_requests?state=all" | field 'len(j)')," \
  "comments on #$ISSUE: $(api "/projects/1/issues/$ISSUE/notes" | field 'len(j)'),"
echo "branch step-runner/issue-$ISSUE: $HEAD_BEFORE before, $(api "/projects/1/repository/branches/step-runner%2Fissue-$ISSUE" | field 'j["commit"]["id"][:12]') after"

say "the token: nowhere in the logs, the daemon's state or the workspaces (both jobs)"
FILES=$(find "$WORK/state" "$WORK"/workspace* -type f | wc -l)
if grep -rqF -- "$TOKEN" "$WORK/state" "$WORK"/workspace* "$WORK/full" "$WORK/again.log" "$WORK/daemon.log"; then
  echo "LEAK: the token is in:" >&2
  grep -rlF -- "$TOKEN" "$WORK/state" "$WORK"/workspace* "$WORK/full" "$WORK/again.log" "$WORK/daemon.log" >&2
  exit 1
fi
echo "not in the jobs' logs, the daemon's log, or any of the $FILES files under its state dir and the work dirs"

say "every job the daemon knows: step-runner status"
"$SR" status
exit "$again"
