#!/usr/bin/env bash
# Creates <repo>/.venv (if missing) with the pinned Python packages of
# scripts/python-requirements.txt, for the channels_redis interoperability test
# (tests/python_interop.rs). Idempotent: a venv that already satisfies the pins is left as it is.
# Prints the interpreter path on its last line.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
requirements="$repo/scripts/python-requirements.txt"
python="${PYTHON:-python3}"

if ! command -v "$python" >/dev/null 2>&1; then
    echo "setup-python: $python not found; install Python 3.10+ (e.g. apt-get install -y python3 python3-venv)" >&2
    exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "setup-python: creating $venv" >&2
    if ! "$python" -m venv "$venv"; then
        rm -rf "$venv"
        echo "setup-python: '$python -m venv' failed (on Debian: apt-get install -y python3-venv)" >&2
        exit 1
    fi
fi

# Skip pip entirely when every pin is already installed (keeps repeated CI runs fast and offline).
if "$venv/bin/python" - "$requirements" <<'PY' 2>/dev/null; then
import sys
from importlib.metadata import version, PackageNotFoundError
ok = True
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, _, pinned = line.partition("==")
    try:
        ok &= version(name) == pinned
    except PackageNotFoundError:
        ok = False
sys.exit(0 if ok else 1)
PY
    echo "setup-python: $venv already has the pinned packages" >&2
else
    echo "setup-python: installing $(grep -cv '^\s*\(#\|$\)' "$requirements") pinned packages into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --requirement "$requirements"
    "$venv/bin/python" -c "import channels_redis.core, channels, redis, msgpack, django" \
        || { echo "setup-python: installed packages do not import" >&2; exit 1; }
fi

echo "$venv/bin/python"
