#!/usr/bin/env bash
# setup-test.sh — what `make test` needs beyond the host set-up and the observability tools:
# Debian's musl (its dynamic loader, /lib/ld-musl-x86_64.so.1, is the second loader
# tests/unit/test_ldso.py checks the loader parser against). Test-only: `make install` and
# the package never install it. Idempotent: nothing is fetched when it is there.
set -euo pipefail
say() { echo "setup-test: $*" >&2; }
[ "$(id -u)" -eq 0 ] || { say "run as root (apt-get needs it)"; exit 3; }
if ! dpkg-query -W -f='${Status}' musl 2>/dev/null | grep -q "install ok installed"; then
    say "installing musl"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends musl >/dev/null
fi
