#!/usr/bin/env bash
# Lays out the workspace image's filesystem under DESTDIR from a CMake build directory.
#
#   bash workspace-image/install.sh [--build-dir DIR] [--create-user] DESTDIR
#
# This is the one install step of the image: the Dockerfile runs it into / of the final stage,
# and the tests run it into a temporary root, then start the entrypoint against that root. So
# what the tests check is what the image contains.
#
#   --build-dir DIR   where step-runner was built (default: build, relative to the source tree)
#   --create-user     add the `workspace` user (uid 1000) to DESTDIR/etc/passwd with useradd
#                     --root (the Dockerfile's final stage; needs root and DESTDIR/etc/passwd)
#
# Layout (paths inside DESTDIR):
#   usr/bin/step-runner                   the CLI; `step-runner serve` execs the daemon beside it
#   usr/bin/step-runner-daemon            the daemon (finds the catalog at ../share)
#   usr/bin/step-runner-git               fetches git step references for the daemon (beside it)
#   usr/bin/step-runner-sandbox           the step sandbox's helper (beside step-runner, where it is looked for)
#   usr/bin/sr-catalog                    the catalog helper, when the build has it
#   usr/bin/step-runner-entrypoint        the container's entrypoint
#   usr/share/step-runner/steps/          the step catalog (steps-catalog/, data only), where the
#                                         daemon looks for it: ../share/step-runner/steps from its binary
#   etc/step-runner/sshd_config           sshd for the workspace user (non-root, port 2222)
#   etc/profile.d/step-runner.sh          STEP_RUNNER_SOCKET for login shells
#   workspace/                            mount point of the workspace volume
#   run/step-runner/                      the daemon's socket directory
#   home/workspace/                       the workspace user's home
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
BUILD="$SRC/build"
CREATE_USER=0
DESTDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) BUILD=$2; shift 2 ;;
    --build-dir=*) BUILD=${1#*=}; shift ;;
    --create-user) CREATE_USER=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "install.sh: unknown option $1" >&2; exit 2 ;;
    *) [ -z "$DESTDIR" ] || { echo "install.sh: one DESTDIR only" >&2; exit 2; }; DESTDIR=$1; shift ;;
  esac
done
[ -n "$DESTDIR" ] || { echo "usage: install.sh [--build-dir DIR] [--create-user] DESTDIR" >&2; exit 2; }
case "$BUILD" in /*) ;; *) BUILD="$SRC/$BUILD" ;; esac

WORKSPACE_USER=workspace
WORKSPACE_UID=1000
say() { echo "install.sh: $*"; }

[ -x "$BUILD/step-runner/step-runner" ] || {
  echo "install.sh: $BUILD/step-runner/step-runner is missing: build it first (cmake + ninja step-runner)" >&2
  exit 1
}
mkdir -p "$DESTDIR"
DESTDIR=$(cd "$DESTDIR" && pwd)

# Binaries and scripts: root-owned and not writable by the workspace user, so code running as
# that user cannot replace the daemon it talks to.
install -d -m 0755 "$DESTDIR/usr/bin" "$DESTDIR/usr/share/step-runner/steps" "$DESTDIR/etc/step-runner"
install -m 0755 "$BUILD/step-runner/step-runner" "$DESTDIR/usr/bin/step-runner"
# `step-runner serve` execs the daemon, which runs step-runner-git for git step references:
# both are looked for beside step-runner.
for program in step-runner-daemon step-runner-git; do
  [ -x "$BUILD/step-runner/$program" ] || {
    echo "install.sh: $BUILD/step-runner/$program is missing: build it first (ninja step-runner builds it)" >&2
    exit 1
  }
  install -m 0755 "$BUILD/step-runner/$program" "$DESTDIR/usr/bin/$program"
done
install -m 0755 "$SRC/workspace-image/entrypoint.sh" "$DESTDIR/usr/bin/step-runner-entrypoint"
# The step sandbox's helper: the daemon looks for it beside its own binary.
if [ -x "$BUILD/step-runner/step-runner-sandbox" ]; then
  install -m 0755 "$BUILD/step-runner/step-runner-sandbox" "$DESTDIR/usr/bin/step-runner-sandbox"
else
  say "note: $BUILD/step-runner/step-runner-sandbox is not built; only --sandbox=none will work"
fi
# The catalog's steps exec sr-catalog from PATH.
helper=""
for candidate in "$BUILD/steps-catalog/helper/sr-catalog" "$BUILD/steps-catalog/sr-catalog"; do
  if [ -x "$candidate" ]; then helper=$candidate; break; fi
done
if [ -n "$helper" ]; then
  install -m 0755 "$helper" "$DESTDIR/usr/bin/sr-catalog"
else
  say "note: sr-catalog is not built in $BUILD/steps-catalog; the image ships without the catalog helper"
fi

# The catalog is data: step files and their docs. Sources, tests and build files stay out.
catalog_files=0
if [ -d "$SRC/steps-catalog" ]; then
  while IFS= read -r -d '' f; do
    rel=${f#"$SRC/steps-catalog/"}
    install -D -m 0644 "$f" "$DESTDIR/usr/share/step-runner/steps/$rel"
    catalog_files=$((catalog_files + 1))
  done < <(find "$SRC/steps-catalog" \( -name build -o -name tests -o -name 'build-*' \) -prune -o -type f \
             \( -name '*.yml' -o -name '*.yaml' -o -name '*.md' -o -name '*.json' -o -name '*.sh' \) -print0)
fi
say "catalog: $catalog_files files in usr/share/step-runner/steps"

install -m 0644 "$SRC/workspace-image/sshd_config" "$DESTDIR/etc/step-runner/sshd_config"
# Login shells (sshd sessions) find the daemon without flags; containers get it from the image's ENV.
install -d -m 0755 "$DESTDIR/etc/profile.d"
echo 'export STEP_RUNNER_SOCKET=/run/step-runner/step-runner.sock' > "$DESTDIR/etc/profile.d/step-runner.sh"
chmod 0644 "$DESTDIR/etc/profile.d/step-runner.sh"

# Directories the workspace user writes. Owner uid 1000 and group 0 with group rwx: GitLab
# workspaces (and OpenShift) run the container under another uid in group 0, which must still
# be able to use them.
install -d -m 0770 "$DESTDIR/workspace" "$DESTDIR/run/step-runner" "$DESTDIR/home/$WORKSPACE_USER"
if [ "$(id -u)" -eq 0 ]; then
  chown "$WORKSPACE_UID:0" "$DESTDIR/workspace" "$DESTDIR/run/step-runner" "$DESTDIR/home/$WORKSPACE_USER"
else
  say "note: not root, so the writable directories keep uid $(id -u) instead of $WORKSPACE_UID"
fi

if [ "$CREATE_USER" -eq 1 ]; then
  if grep -q "^$WORKSPACE_USER:" "$DESTDIR/etc/passwd" 2>/dev/null; then
    say "user $WORKSPACE_USER exists already"
  else
    useradd --root "$DESTDIR" --uid "$WORKSPACE_UID" --user-group --no-create-home \
      --home-dir "/home/$WORKSPACE_USER" --shell /bin/bash "$WORKSPACE_USER"
    say "added user $WORKSPACE_USER (uid $WORKSPACE_UID)"
  fi
fi
say "installed into $DESTDIR"
