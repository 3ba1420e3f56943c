#!/usr/bin/env bash
# The workspace container's entrypoint (installed as /usr/bin/step-runner-entrypoint).
#
#  1. prepares the workspace directory and the daemon's state directory on the workspace volume;
#  2. writes the injected forge token to git's credential store of the workspace user
#     (~/.git-credentials, 0600; credential.helper=store), never into a remote URL, and then
#     re-executes itself without the token in its environment, so that no process started from
#     here (the daemon, its steps, sshd) inherits it, and /proc/1/environ does not show it;
#  3. starts `step-runner serve` on /run/step-runner/step-runner.sock with its state on the volume;
#  4. optionally starts sshd (SR_SSHD=1) for developers who resume the workspace;
#  5. forwards SIGTERM/SIGINT/SIGHUP to the daemon (which cancels running jobs gracefully and
#     records them) and to sshd, waits, and exits with the daemon's exit status.
#
# As PID 1 it also reaps orphans: bash collects every child that exits, including processes
# re-parented to it, whenever it gets SIGCHLD (also while it sits in `wait`). That is why no tini
# or dumb-init is needed: it would be one more process and package for what bash does already,
# and the tests check it (an orphan under this script as PID 1 does not stay a zombie).
#
# Environment (all optional):
#   GITLAB_TOKEN            the forge token (removed from the environment after it is stored)
#   SR_TOKEN_FILE           a mounted file with the token (default: the file GitLab workspaces name
#                           in GL_TOKEN_FILE_PATH or GITLAB_WORKFLOW_TOKEN_FILE, else
#                           /run/secrets/step-runner/gitlab-token)
#   SR_FORGE_URL            the forge the token is for (default: $GITLAB_WORKFLOW_INSTANCE_URL, else
#                           https://gitlab.com)
#   SR_WORKSPACE            the workspace volume (default /workspace)
#   SR_SOCKET, SR_STATE_DIR the daemon's socket and state (default /run/step-runner/step-runner.sock
#                           and $SR_WORKSPACE/.step-runner)
#   SR_SANDBOX, SR_SANDBOX_WARM, SR_NETWORK, SR_ALLOW_HOSTS (comma or space separated HOST:PORT), SR_HIDE,
#   SR_LIMIT_MEMORY, SR_LIMIT_CPU, SR_LIMIT_PROCS, SR_LIMIT_FILES, SR_LIMIT_OUTPUT, SR_LOG_LEVEL,
#   SR_GRACEFUL_EXIT_TIMEOUT, SR_MAX_JOBS, SR_MAX_AGE, SR_ALLOW_UIDS
#                           passed to `step-runner serve` as the matching flags, only when set
#   SR_SSHD=1               also run sshd (SR_SSHD_PORT, default 2222; host key in SR_SSHD_DIR,
#                           default $SR_STATE_DIR/sshd, which steps cannot read under the sandbox)
#   SR_ROOT                 a prefix for every image path above (the tests run the image's layout
#                           from a temporary directory)
set -euo pipefail

ROOT=${SR_ROOT:-}
SR_BIN=${SR_BIN:-$ROOT/usr/bin/step-runner}
SR_WORKSPACE=${SR_WORKSPACE:-$ROOT/workspace}
SR_SOCKET=${SR_SOCKET:-$ROOT/run/step-runner/step-runner.sock}
SR_STATE_DIR=${SR_STATE_DIR:-$SR_WORKSPACE/.step-runner}
SR_TOKEN_FILE=${SR_TOKEN_FILE:-${GL_TOKEN_FILE_PATH:-${GITLAB_WORKFLOW_TOKEN_FILE:-$ROOT/run/secrets/step-runner/gitlab-token}}}
SR_FORGE_URL=${SR_FORGE_URL:-${GITLAB_WORKFLOW_INSTANCE_URL:-https://gitlab.com}}
SR_SSHD_BIN=${SR_SSHD_BIN:-/usr/sbin/sshd}
SR_SSHD_CONFIG=${SR_SSHD_CONFIG:-$ROOT/etc/step-runner/sshd_config}
SR_SSHD_PORT=${SR_SSHD_PORT:-2222}
SR_SSHD_DIR=${SR_SSHD_DIR:-$SR_STATE_DIR/sshd}

log() { printf 'step-runner-entrypoint: %s\n' "$*" >&2; }

# A signal before the children exist is remembered and acted on once they do.
stopping=0
daemon_pid=""
sshd_pid=""
forward_stop() {
  stopping=1
  # SIGTERM for SIGINT too: background children of a non-interactive shell start with SIGINT
  # ignored, so a forwarded SIGINT would be lost; the daemon treats both the same.
  local pid
  for pid in $daemon_pid $sshd_pid; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap forward_stop TERM INT HUP

# HOME: Docker sets it from USER workspace. Under an arbitrary uid (GitLab workspaces, OpenShift)
# there is no passwd entry and HOME is / or unset; the image's home is group-0 writable for them.
if [ -z "${HOME:-}" ] || [ "$HOME" = / ] || [ ! -w "$HOME" ]; then
  export HOME="$ROOT/home/workspace"
fi
mkdir -p "$HOME"

# Percent-encodes a credential for the userinfo part of a URL (git decodes it again).
url_encode() {
  local LC_ALL=C s=$1 out="" c i
  for ((i = 0; i < ${#s}; i++)); do
    c=${s:i:1}
    case "$c" in
      [A-Za-z0-9._~-]) out+=$c ;;
      *) printf -v c '%%%02X' "'$c"; out+=$c ;;
    esac
  done
  printf '%s' "$out"
}

# Stores the token for SR_FORGE_URL's scheme and host in ~/.git-credentials, replacing an earlier
# entry for the same host and keeping the others. The token only ever passes through bash
# builtins (printf), never a command line; the file is created 0600 and renamed into place.
store_token() {
  local token=$1 scheme host_port tmp creds="$HOME/.git-credentials"
  scheme=${SR_FORGE_URL%%://*}
  host_port=${SR_FORGE_URL#*://}
  host_port=${host_port%%/*}
  host_port=${host_port##*@}
  if [ -z "$host_port" ] || [ "$scheme" = "$SR_FORGE_URL" ]; then
    log "SR_FORGE_URL must look like https://HOST[:PORT], got: $SR_FORGE_URL"
    exit 2
  fi
  tmp=$(umask 077 && mktemp "$HOME/.git-credentials.XXXXXX")
  {
    if [ -f "$creds" ]; then
      awk -v h="@$host_port" 'substr($0, length($0) - length(h) + 1) != h' "$creds"
    fi
    printf '%s://oauth2:%s@%s\n' "$scheme" "$(url_encode "$token")" "$host_port"
  } > "$tmp"
  chmod 0600 "$tmp"
  mv -f "$tmp" "$creds"
  git config --global --replace-all credential.helper store
  log "forge credentials stored for $scheme://$host_port in $creds"
}

if [ -n "${GITLAB_TOKEN:-}" ]; then
  store_token "$GITLAB_TOKEN"
  # exec keeps the PID (PID 1 stays PID 1) and gives the new image an environment without the
  # token; `unset` alone would leave it readable in /proc/self/environ.
  exec env -u GITLAB_TOKEN "$BASH" "$0" "$@"
elif [ -r "$SR_TOKEN_FILE" ]; then
  token=$(<"$SR_TOKEN_FILE")
  token=${token//[$'\r\n\t ']/}
  if [ -n "$token" ]; then store_token "$token"; fi
  unset token
fi
unset GITLAB_TOKEN 2>/dev/null || true

# The workspace volume: the work trees, and the daemon's state (owner-only, as the daemon wants).
# Only the last directory of each path needs the mode; the parents are the image's or the volume's.
mkdir -p "$SR_WORKSPACE"
# shellcheck disable=SC2174
mkdir -p -m 0700 "$SR_STATE_DIR"
# shellcheck disable=SC2174
mkdir -p -m 0700 "$(dirname "$SR_SOCKET")"
cd "$SR_WORKSPACE"

serve=("$SR_BIN" serve --socket "$SR_SOCKET" --state-dir "$SR_STATE_DIR")
# Each variable that is set becomes its flag; lists (comma or space separated) repeat it.
for pair in SR_SANDBOX:sandbox SR_SANDBOX_WARM:sandbox-warm SR_NETWORK:network SR_LOG_LEVEL:log-level \
            SR_GRACEFUL_EXIT_TIMEOUT:graceful-exit-timeout SR_MAX_JOBS:max-jobs SR_MAX_AGE:max-age \
            SR_LIMIT_MEMORY:limit-memory SR_LIMIT_CPU:limit-cpu SR_LIMIT_PROCS:limit-procs \
            SR_LIMIT_FILES:limit-files SR_LIMIT_OUTPUT:limit-output; do
  var=${pair%%:*}
  [ -z "${!var:-}" ] || serve+=("--${pair#*:}=${!var}")
done
for pair in SR_ALLOW_HOSTS:allow-host SR_ALLOW_UIDS:allow-uid SR_HIDE:hide; do
  var=${pair%%:*}
  list=${!var:-}
  for item in ${list//,/ }; do serve+=("--${pair#*:}" "$item"); done
done

export STEP_RUNNER_SOCKET="$SR_SOCKET"
if [ "$stopping" -eq 1 ]; then log "stopped before start-up"; exit 143; fi
log "starting: ${serve[*]}"
"${serve[@]}" &
daemon_pid=$!

if [ "${SR_SSHD:-0}" = 1 ]; then
  # shellcheck disable=SC2174
  mkdir -p -m 0700 "$SR_SSHD_DIR"
  if [ ! -f "$SR_SSHD_DIR/ssh_host_ed25519_key" ]; then
    ssh-keygen -q -t ed25519 -N '' -C step-runner-workspace -f "$SR_SSHD_DIR/ssh_host_ed25519_key"
  fi
  "$SR_SSHD_BIN" -D -e -f "$SR_SSHD_CONFIG" -h "$SR_SSHD_DIR/ssh_host_ed25519_key" -p "$SR_SSHD_PORT" \
    -o PidFile=none &
  sshd_pid=$!
  log "sshd on port $SR_SSHD_PORT (pid $sshd_pid)"
fi
if [ "$stopping" -eq 1 ]; then forward_stop; fi

# `wait PID` returns early whenever a trapped signal arrives; the loop goes back to waiting until
# the daemon itself has ended. The last `wait` returns its status (bash keeps it once reaped).
while kill -0 "$daemon_pid" 2>/dev/null; do
  wait "$daemon_pid" || true
done
status=0
wait "$daemon_pid" || status=$?
log "step-runner exited with status $status"

if [ -n "$sshd_pid" ]; then
  kill -TERM "$sshd_pid" 2>/dev/null || true
  # sshd ends at once on SIGTERM; the bound is for a wedged one, which then gets SIGKILL.
  for _ in $(seq 1 50); do kill -0 "$sshd_pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$sshd_pid" 2>/dev/null || true
  wait "$sshd_pid" 2>/dev/null || true
fi
exit "$status"
