#!/usr/bin/env bash
# setup-observability.sh — give this host the Prometheus tools the dashboard and alert-rule
# tests need (promtool from Debian's `prometheus`, amtool from `prometheus-alertmanager`),
# idempotently, without leaving the Prometheus or Alertmanager daemons running on their
# default ports (9090, 9093, 9094) because a package's postinst started them.
#
#   bash packaging/setup-observability.sh      # as root; prints promtool's path on stdout
#
# - Packages already installed are left as they are (no apt-get call at all).
# - While it installs, a temporary /usr/sbin/policy-rc.d (exit 101) keeps invoke-rc.d and
#   deb-systemd-invoke from starting the services (unless the host already has one, which
#   is then used as it is). On systemd hosts the postinst still *enables* the units: the
#   ones this run installed are disabled again.
# - With CI=true the two services are also stopped and disabled when an earlier install
#   left them running; without CI a service that was installed before is only reported.
# Says on stderr what it found or did; exit 3 when something could not be had.
set -euo pipefail

say() { echo "setup-observability: $*" >&2; }
die() { echo "setup-observability: $*" >&2; exit 3; }

[ "$(id -u)" -eq 0 ] || die "run as root (apt-get and the services need it)"

PKGS=(prometheus prometheus-alertmanager)
# package -> its service (the same name for both)
SERVICES=(prometheus prometheus-alertmanager)
CI="${CI:-}"

is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for p in "${PKGS[@]}"; do is_installed "$p" || missing+=("$p"); done

POLICY=/usr/sbin/policy-rc.d
OUR_POLICY=0
cleanup() { if [ "$OUR_POLICY" -eq 1 ]; then rm -f "$POLICY"; fi; }
trap cleanup EXIT

if [ ${#missing[@]} -gt 0 ]; then
    if [ -e "$POLICY" ]; then
        say "$POLICY exists already: using it as it is"
    else
        printf '#!/bin/sh\n# temporary, from agentwatch packaging/setup-observability.sh\nexit 101\n' >"$POLICY"
        chmod 0755 "$POLICY"
        OUR_POLICY=1
    fi
    say "apt-get update"
    apt-get update -q >/dev/null || die "apt-get update failed"
    say "installing ${missing[*]} (services not started)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
        >/dev/null || die "apt-get install ${missing[*]} failed"
    cleanup
    OUR_POLICY=0
else
    say "${PKGS[*]} already installed"
fi

just_installed() {
    local p
    for p in "${missing[@]}"; do [ "$p" = "$1" ] && return 0; done
    return 1
}

# systemd is the init only where it is PID 1 (containers and CI sandboxes often have another).
init=$(ps -p 1 -o comm= 2>/dev/null | tr -d ' ' || true)
if [ "$init" = systemd ] && [ -d /run/systemd/system ]; then
    for s in "${SERVICES[@]}"; do
        if just_installed "$s" || [ "$CI" = true ]; then
            if systemctl is-enabled --quiet "$s" 2>/dev/null || systemctl is-active --quiet "$s"; then
                say "systemd: stopping and disabling $s"
                systemctl disable --now --quiet "$s" >/dev/null 2>&1 || say "could not disable $s"
            fi
        elif systemctl is-active --quiet "$s"; then
            say "systemd: $s was installed before and is running: left alone (CI=true stops it)"
        fi
    done
else
    say "init is '${init:-unknown}', not systemd: checking the SysV init scripts"
    for s in "${SERVICES[@]}"; do
        [ -x "/etc/init.d/$s" ] || continue
        if just_installed "$s" || [ "$CI" = true ]; then
            if "/etc/init.d/$s" status >/dev/null 2>&1; then
                say "stopping $s (/etc/init.d/$s stop)"
                "/etc/init.d/$s" stop >/dev/null 2>&1 || say "could not stop $s"
            fi
            # keep it from starting at boot on a SysV host (harmless where nothing boots)
            update-rc.d "$s" disable >/dev/null 2>&1 || true
        elif "/etc/init.d/$s" status >/dev/null 2>&1; then
            say "$s was installed before and is running: left alone (CI=true stops it)"
        fi
    done
fi

# Anything of theirs still listening on the default ports?
if command -v ss >/dev/null 2>&1; then
    listening=$(ss -Hltnp 2>/dev/null | grep -E '"(prometheus|prometheus-alertmanager|alertmanager)"' || true)
    if [ -n "$listening" ]; then
        if [ "$CI" = true ]; then
            die "Prometheus/Alertmanager still listening under CI: $listening"
        fi
        say "note: still listening (installed before this script): $listening"
    fi
fi

promtool=$(command -v promtool || true)
[ -n "$promtool" ] || die "promtool not found after installing prometheus"
say "promtool: $promtool ($("$promtool" --version 2>&1 | head -1))"
amtool=$(command -v amtool || true)
[ -n "$amtool" ] && say "amtool: $amtool"
echo "$promtool"
