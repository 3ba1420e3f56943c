#!/usr/bin/env python3
"""Lints workspace-image/Dockerfile, since no container engine runs on the build machines.

Checks that a `docker build` would do what the tests prove:
  - every RUN step is a command the tests run: scripts/build.sh or scripts/setup.sh (CI builds
    with them), workspace-image/install.sh (run here with the Dockerfile's own flags, into a
    temporary root, and by entrypoint_test.sh), or apt-get install of Debian packages;
  - every package the Dockerfile installs exists in Debian 12 (apt-cache show), the issue's
    packages are among them, and together with the base image they provide every shared library
    that the installed binaries load (ldd, dpkg -S, apt-cache depends);
  - the final stage runs as a non-root user that the install step creates, with the entrypoint
    the install step installs.

  python3 tests/image/dockerfile_lint_test.py SOURCE_DIR BUILD_DIR
"""
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

SRC, BUILD = (os.path.abspath(p) for p in sys.argv[1:3])
DOCKERFILE = os.path.join(SRC, "workspace-image", "Dockerfile")
IS_ROOT = os.geteuid() == 0
failures = []
passes = 0


def check(ok, message):
    global passes
    if ok:
        passes += 1
        print("PASS:", message)
    else:
        failures.append(message)
        print("FAIL:", message)


def run(argv, timeout=120, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def parse(path):
    """Instructions as (stage index, KEYWORD, argument text), continuations joined, comments dropped."""
    instructions, stage, current = [], -1, ""
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not current and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.lstrip().startswith("#"):  # a comment inside a continued instruction
                continue
            if line.endswith("\\"):
                current += line[:-1] + " "
                continue
            current += line
            keyword, _, rest = current.strip().partition(" ")
            keyword = keyword.upper()
            if keyword == "FROM":
                stage += 1
            instructions.append((stage, keyword, rest.strip()))
            current = ""
    return instructions


instructions = parse(DOCKERFILE)
stages = [rest for _, kw, rest in instructions if kw == "FROM"]
final = len(stages) - 1
check(len(stages) >= 2 and " AS build" in stages[0], f"multi-stage, build stage first: {stages}")
check(all(re.match(r"debian:(12|bookworm)(-slim)?( |$)", s) for s in stages), "every stage is Debian 12")

# --- RUN steps ---------------------------------------------------------------------------------
apt_packages = []
install_runs = []
for stage, kw, rest in instructions:
    if kw != "RUN":
        continue
    # BuildKit mount options come before the command.
    mounts = re.findall(r"--mount=(\S+)", rest)
    command = re.sub(r"--mount=\S+\s*", "", rest).strip()
    parts = [p.strip() for p in command.split("&&")]
    known = True
    for part in parts:
        words = shlex.split(part)
        if words[:2] in (["bash", "scripts/build.sh"], ["bash", "scripts/setup.sh"]):
            continue
        if words[:1] in (["cmake"], ["ninja"]):
            continue
        if len(words) >= 2 and words[0] == "bash" and words[1].endswith("workspace-image/install.sh"):
            install_runs.append((stage, words, mounts))
            continue
        if words[:2] == ["apt-get", "update"]:
            continue
        if words[:2] == ["apt-get", "install"]:
            apt_packages += [w for w in words[2:] if not w.startswith("-")]
            continue
        # Cleaning up after apt: its lists, and the host keys openssh-server's package generates.
        if words[:3] == ["rm", "-rf", "/var/lib/apt/lists/*"] or words[:3] == ["rm", "-f", "/etc/ssh/ssh_host_*"]:
            continue
        known = False
        print("  not a step the tests run:", part)
    check(known, f"RUN in stage {stage} is a command the tests run: {command[:70]}")

check(len(install_runs) == 1 and install_runs[0][0] == final, "install.sh runs exactly once, in the final stage")

# --- packages ----------------------------------------------------------------------------------
if run(["apt-cache", "show", "bash"]).returncode != 0 and IS_ROOT:
    # apt-cache knows nothing before a first `apt-get update` (a fresh machine).
    run(["apt-get", "update", "-qq"], timeout=300)
# One query for all; one per package only to name the missing ones.
missing = []
if run(["apt-cache", "show"] + apt_packages).returncode != 0:
    missing = [p for p in apt_packages if run(["apt-cache", "show", p]).returncode != 0] or ["?"]
check(apt_packages and not missing, f"{len(apt_packages)} packages exist in Debian 12 (missing: {missing})")
for needed in ("git", "bubblewrap", "openssh-server", "ca-certificates"):
    check(needed in apt_packages, f"the final stage installs {needed}")

# --- the install step, exactly as the Dockerfile runs it ---------------------------------------
root = tempfile.mkdtemp(prefix="sr-dockerfile-lint.")
try:
    stage, words, mounts = install_runs[0]
    source_mount = next((m for m in mounts if "from=build" in m), "")
    target = re.search(r"target=([^,]+)", source_mount)
    check(target is not None, "install.sh reads the build stage through a bind mount")
    in_image = target.group(1) if target else "/src"
    # The image's paths, mapped onto this machine: the mount onto the source tree, the build stage's
    # build/ onto the build dir under test, / onto a temporary root with the base image's user files.
    argv = []
    for w in words:
        if w == in_image + "/build":
            w = BUILD
        elif w.startswith(in_image + "/"):
            w = SRC + w[len(in_image):]
        elif w == "/":
            w = root
        argv.append(w)
    create_user = "--create-user" in argv
    if create_user and not IS_ROOT:
        print("note: not root, so install.sh runs without --create-user (useradd --root needs root)")
        argv.remove("--create-user")
        create_user = False
    os.makedirs(os.path.join(root, "etc"))
    for name, content in (("passwd", "root:x:0:0:root:/root:/bin/bash\n"), ("group", "root:x:0:\n"),
                          ("shadow", "root:*:19000:0:99999:7:::\n"), ("gshadow", "root:*::\n")):
        with open(os.path.join(root, "etc", name), "w") as f:
            f.write(content)
    result = run(argv, timeout=300)
    print(result.stdout + result.stderr)
    check(result.returncode == 0, f"the Dockerfile's install step runs: {' '.join(argv)}")

    users = {}
    with open(os.path.join(root, "etc", "passwd")) as f:
        for line in f:
            fields = line.rstrip("\n").split(":")
            users[fields[0]] = int(fields[2])
    users_final = [rest for s, kw, rest in instructions if kw == "USER" and s == final]
    user = users_final[-1] if users_final else None
    name = (user or "").split(":")[0]
    check(user is not None and name not in ("root", "0"), f"the final stage runs as a non-root user ({user})")
    if create_user:
        check(users.get(name) == 1000,
              f"the install step creates {name} with uid 1000 (passwd: {users})")

    entrypoints = [rest for s, kw, rest in instructions if kw == "ENTRYPOINT" and s == final]
    entrypoint = json.loads(entrypoints[-1]) if entrypoints else []
    check(entrypoint == ["/usr/bin/step-runner-entrypoint"], f"ENTRYPOINT in exec form is the entrypoint: {entrypoint}")
    installed = os.path.join(root, entrypoint[0].lstrip("/")) if entrypoint else ""
    check(installed and os.access(installed, os.X_OK), "the install step installs the ENTRYPOINT executable")
    env = [rest for s, kw, rest in instructions if kw == "ENV" and s == final]
    check("STEP_RUNNER_SOCKET=/run/step-runner/step-runner.sock" in env, "ENV STEP_RUNNER_SOCKET is the daemon's socket")

    # --- shared libraries: provided by the listed packages (with their dependencies) or the base --
    bindir = os.path.join(root, "usr", "bin")
    libs = set()
    for name in sorted(os.listdir(bindir)):
        path = os.path.join(bindir, name)
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                continue
        out = run(["ldd", path]).stdout
        check("not found" not in out, f"{name}: every library resolves")
        libs |= set(re.findall(r"=> (/\S+)", out))
    # One dpkg -S for all: merged /usr means a library may be registered under /lib or /usr/lib.
    candidates = {}
    for lib in libs:
        for c in {lib, os.path.realpath(lib)}:
            for variant in (c, c[4:] if c.startswith("/usr/") else "/usr" + c):
                candidates[variant] = lib
    owners = dict.fromkeys(libs)
    for line in run(["dpkg", "-S"] + sorted(candidates)).stdout.splitlines():
        package, _, path = line.partition(": ")
        if path in candidates:
            owners[candidates[path]] = package.split(",")[0].split(":")[0].strip()
    closure = set()
    if apt_packages:
        out = run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                   "--no-breaks", "--no-replaces", "--no-enhances"] + apt_packages, timeout=300).stdout
        for line in out.splitlines():
            m = re.match(r"^\s*(?:\|?(?:Pre)?Depends:\s*)?<?([a-z0-9][a-z0-9+.-]*)>?", line)
            if m:
                closure.add(m.group(1))
    uncovered = []
    for lib, owner in owners.items():
        if owner is None:
            uncovered.append(f"{lib} (no package)")
            continue
        priority = run(["dpkg-query", "-W", "-f=${Priority}", owner]).stdout.strip()
        if owner not in closure and priority != "required":
            uncovered.append(f"{lib} ({owner})")
    check(libs and not uncovered,
          f"{len(libs)} libraries come from the installed packages or the base image (uncovered: {uncovered})")
finally:
    subprocess.run(["rm", "-rf", root])

ignore = os.path.join(SRC, "workspace-image", "Dockerfile.dockerignore")
check(os.path.exists(ignore) and "build" in open(ignore).read().split(), "host build trees stay out of the build context")

print(f"dockerfile_lint_test: {passes} checks passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
