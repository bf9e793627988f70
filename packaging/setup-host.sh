#!/usr/bin/env bash
# setup-host.sh — give a Debian 12 host what agentwatch's probes need, idempotently:
#   Debian's BCC (python3-bpfcc), kernel headers BCC can compile against, tracefs mounted.
# Says on stderr what it found or chose. Changes nothing that is already in place.
set -euo pipefail

say() { echo "setup: $*" >&2; }
die() { echo "setup: $*" >&2; exit 3; }

[ "$(id -u)" -eq 0 ] || die "run as root (apt-get, /lib/modules and mount need it)"

APT_UPDATED=0
apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        apt-get update -q >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
}

# 1. BCC from Debian (not on PyPI), a venv-capable python, and tools the tests use.
apt_install python3-bpfcc python3-venv python3-pip iproute2 procps util-linux systemd openssh-client gcc git

# 2. Kernel headers.
release=$(uname -r)
build="/lib/modules/$release/build"
if [ -d "$build/include" ]; then
    say "kernel headers: using $build"
else
    if [ "$APT_UPDATED" -eq 0 ]; then apt-get update -q >/dev/null; APT_UPDATED=1; fi
    if apt-cache show "linux-headers-$release" >/dev/null 2>&1; then
        say "kernel headers: linux-headers-$release matches the running kernel"
        apt_install "linux-headers-$release"
    else
        # No package for this kernel (e.g. a custom VM kernel): take the nearest Debian
        # headers at or below the running version, preferring the cloud flavour.
        arch=$(dpkg --print-architecture)
        running=$(echo "$release" | grep -oE '^[0-9]+\.[0-9]+')
        pick=$(apt-cache pkgnames linux-headers- \
            | grep -E "^linux-headers-[0-9]+\.[0-9]+-(cloud-)?$arch\$" \
            | sed -E "s/^linux-headers-([0-9]+\.[0-9]+)-(cloud-)?$arch\$/\1 x\2 &/" \
            | awk -v r="$running" '{split($1,a,"."); split(r,b,".");
                   v=a[1]*1000+a[2]; rv=b[1]*1000+b[2];
                   score=(v<=rv ? v : -v) * 10 + ($2=="xcloud-" ? 1 : 0); print score, $3}' \
            | sort -n | tail -1 | cut -d' ' -f2)
        [ -n "$pick" ] || die "no linux-headers package for $release and no Debian headers to fall back on: install headers for this kernel and link them at $build"
        say "kernel headers: no package for $release; using the nearest Debian headers, $pick (struct offsets may differ: the probes read only tracepoint arguments)"
        apt_install "$pick"
        dir=$(dpkg-query -W -f='${Depends}' "$pick" | grep -oE 'linux-headers-[^ ,]+' | head -1)
        [ -n "$dir" ] || die "could not resolve the headers package behind $pick"
        common=$(dpkg-query -W -f='${Depends}' "$dir" | grep -oE 'linux-headers-[^ ,]+-common' | head -1)
        [ -d "/usr/src/$dir" ] && [ -d "/usr/src/$common" ] || die "headers of $dir not found under /usr/src"
        mkdir -p "/lib/modules/$release"
        ln -sfn "/usr/src/$dir" "/lib/modules/$release/build"
        ln -sfn "/usr/src/$common" "/lib/modules/$release/source"
        say "kernel headers: linked /lib/modules/$release/build -> /usr/src/$dir"
    fi
fi

# 3. tracefs, as systemd mounts it on a normal host.
if [ ! -d /sys/kernel/tracing/events ]; then
    mount -t tracefs nodev /sys/kernel/tracing || die "tracefs could not be mounted at /sys/kernel/tracing"
    say "mounted tracefs at /sys/kernel/tracing"
fi
say "host ready"
