#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing (redis-server, the Python
# venv for the channels_redis and Django interoperability tests, Chromium for the browser test),
# then runs the checks CI runs: rustfmt, clippy with warnings as errors, and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
python3 -m venv --help >/dev/null 2>&1 || missing+=(python3 python3-venv)
if [ -f tests/browser/package.json ]; then
  command -v chromium >/dev/null || missing+=(chromium)
  command -v node >/dev/null || missing+=(nodejs npm)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing: ${missing[*]} — install them (Debian: apt-get install -y ${missing[*]})" >&2
    exit 1
  fi
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

bash scripts/setup-python.sh >/dev/null
export SWITCHYARD_PYTHON="$PWD/.venv/bin/python"
if [ -f tests/browser/package.json ] && [ ! -d tests/browser/node_modules ]; then
  (cd tests/browser && npm ci --silent --no-audit --no-fund)
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo test --workspace --doc -q
  cargo nextest run --workspace --profile ci
else
  cargo test --workspace
fi
