#!/usr/bin/env bash
# install.sh — install agentwatch on this host as a systemd service (`make install`).
# Idempotent: run it again after pulling changes to upgrade; files you edited in
# /etc/agentwatch are kept (`make install ARGS=--force` replaces them, keeping a .bak).
#
#   1. the host prerequisites, as `make setup` installs them (packaging/setup-host.sh);
#   2. a dedicated venv /opt/agentwatch/venv made from /usr/bin/python3 with
#      --system-site-packages (BCC comes from Debian's python3-bpfcc, not from PyPI), with
#      agentwatch pip-installed into it from a snapshot of this source tree (not editable:
#      a root service must not run code from a checkout that someone else may write to);
#   3. the BPF sources in /usr/share/agentwatch/probes (where the monitor looks for them
#      outside a source tree), the unit and docs/service.md under /usr/share;
#   4. /usr/local/bin/agentwatch -> /opt/agentwatch/venv/bin/agentwatch (the unit's ExecStart);
#   5. `agentwatch install "$@"`: the unit, /etc/agentwatch/{config,policy}.yaml,
#      /var/lib/agentwatch, and `systemctl daemon-reload && systemctl enable` under systemd.
# It never starts or restarts the service: it says when the running one is out of date.
set -euo pipefail
umask 022

say() { echo "install: $*" >&2; }
die() { echo "install: $*" >&2; exit 3; }

[ "$(id -u)" -eq 0 ] || die "run as root: it writes /opt, /usr/local/bin, /usr/share and /etc"

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OPT=/opt/agentwatch
VENV=$OPT/venv
BIN=/usr/local/bin/agentwatch
SHARE=/usr/share/agentwatch
DOC=/usr/share/doc/agentwatch

# 1. BCC, kernel headers, tracefs.
bash "$SRC/packaging/setup-host.sh"

# 2. The venv. Rebuilt only if it is missing or was made without system site packages.
if [ -x "$VENV/bin/python" ] && grep -qE '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg" 2>/dev/null; then
    say "venv: using $VENV"
else
    [ -e "$VENV" ] && say "venv: $VENV lacks system site packages (BCC): making it again"
    rm -rf "$VENV"
    mkdir -p "$OPT"
    /usr/bin/python3 -m venv --system-site-packages "$VENV" || die "could not create $VENV (apt-get install python3-venv)"
    say "venv: created $VENV (system site packages: Debian's BCC)"
fi
"$VENV/bin/python" -c 'import bcc' 2>/dev/null || die "BCC is not importable from $VENV: apt-get install python3-bpfcc"

# pip builds in the directory it is given: give it a snapshot, so the source tree gets no
# build/ or egg-info written by root. pip always reinstalls from a local directory.
snap=$(mktemp -d)
trap 'rm -rf "$snap"' EXIT
cp "$SRC/pyproject.toml" "$SRC/README.md" "$snap/"
cp -RL "$SRC/monitor" "$snap/"  # -L: package data symlinked from packaging/ is copied as a file
find "$snap" -name __pycache__ -prune -exec rm -rf {} +
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-warn-script-location "$snap" \
    || die "pip install into $VENV failed"
say "agentwatch $("$VENV/bin/agentwatch" --version | cut -d' ' -f2) installed in $VENV"

# 3. Shared files, replaced as a whole so a file removed from the tree goes too.
install_dir() {  # install_dir SRC_DIR DEST_DIR FILE...: DEST_DIR holds exactly FILE... (0644)
    local from=$1 to=$2 tmp
    shift 2
    tmp=$(mktemp -d "$(dirname "$to")/.$(basename "$to").XXXXXX")
    for f in "$@"; do install -m 0644 "$from/$f" "$tmp/$f"; done
    chmod 0755 "$tmp"
    rm -rf "$to.old"
    [ -e "$to" ] && mv "$to" "$to.old"
    mv "$tmp" "$to"
    rm -rf "$to.old"
}
mkdir -p "$SHARE" "$DOC"
probes=()
for f in "$SRC"/probes/*.c "$SRC"/probes/*.h; do probes+=("$(basename "$f")"); done
install_dir "$SRC/probes" "$SHARE/probes" "${probes[@]}"
install -m 0644 "$SRC/packaging/agentwatch.service" "$SHARE/agentwatch.service"
install -m 0644 "$SRC/docs/service.md" "$DOC/service.md"
say "BPF sources: $SHARE/probes (${probes[*]})"

# 4. The entry point the unit runs.
ln -sfn "$VENV/bin/agentwatch" "$BIN"
say "linked $BIN -> $VENV/bin/agentwatch"

# 5. Unit, config, policy, state directory; systemctl enable where systemd runs.
"$BIN" install "$@" | sed 's/^/install: /' >&2

if [ -d /run/systemd/system ] && systemctl is-active -q agentwatch.service; then
    say "agentwatch.service is running the code it started with: \`systemctl restart agentwatch\` runs what was just installed"
fi
