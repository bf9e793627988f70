#!/usr/bin/env bash
# setup-bench.sh — install the comparison tools bench/run.py measures agentwatch against:
# Debian's audit daemon (auditd, auditctl) and bpftrace. Idempotent and safe to re-run:
# it changes nothing when both are installed, runs apt-get update only when a package is
# missing, and starts no service: PID 1 is not necessarily systemd, and the bench starts
# and stops auditd itself, around each phase that measures it. While installing, a
# /usr/sbin/policy-rc.d that exits 101 keeps the packages' init scripts from starting
# anything; it is removed afterwards, and only if this script created it.
# Exit code: 0 when both tools are usable, 1 when one or both could not be installed (the
# bench then prints which and leaves those columns out), 3 when not run as root.
set -uo pipefail

say() { echo "setup-bench: $*" >&2; }

[ "$(id -u)" -eq 0 ] || { say "run as root (apt-get needs it)"; exit 3; }

POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
cleanup() {
    if [ "$CREATED_POLICY" -eq 1 ]; then
        rm -f "$POLICY"
        CREATED_POLICY=0
    fi
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for p in auditd bpftrace; do
    installed "$p" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\n# temporary, from agentwatch packaging/setup-bench.sh: start no service\nexit 101\n' >"$POLICY"
        chmod 755 "$POLICY"
        CREATED_POLICY=1
    fi
    say "apt-get update"
    apt-get update -q >/dev/null || say "apt-get update failed; trying with the package lists there are"
    # One package at a time, so that one that cannot be installed does not stop the other.
    for p in "${missing[@]}"; do
        say "installing $p"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$p" >/dev/null \
            || say "apt-get install $p failed"
    done
    cleanup
fi

status=0
if installed auditd && command -v auditd >/dev/null && command -v auditctl >/dev/null; then
    say "auditd: $(dpkg-query -W -f='${Version}' auditd) ($(command -v auditd))"
    # The package's init script may have been started by an earlier install without the
    # policy-rc.d guard; say so (the bench refuses to run its phase next to another auditd).
    for pidfile in /run/auditd.pid /var/run/auditd.pid; do
        if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            say "note: an auditd is running (pid $(cat "$pidfile")), not started by the bench"
            break
        fi
    done
else
    say "auditd: NOT available"
    status=1
fi
if installed bpftrace && command -v bpftrace >/dev/null; then
    say "bpftrace: $(dpkg-query -W -f='${Version}' bpftrace) ($(command -v bpftrace))"
else
    say "bpftrace: NOT available"
    status=1
fi
exit $status
