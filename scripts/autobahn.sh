#!/usr/bin/env bash
# Runs the Autobahn WebSocket conformance suite (cases 1.* to 10.*) against the echo example
# (interface server + raw-layer echo worker, in-memory layer by default) and prints
# `N passed, M failed`. Reports land in reports/autobahn/ (ignored by git).
#
#   scripts/autobahn.sh [LAYER_URL]          # default memory://
#   AUTOBAHN_PROFILE=release scripts/autobahn.sh
#
# The PyPI package `autobahntestsuite` is Python 2 code (Twisted 19, autobahn 0.10). The script
# first tries a Python 3 venv (as the package's name suggests); when its `wstest` does not run
# there, it installs the package for a Python 2.7 interpreter (PATH or pyenv) into
# target/autobahn-py2 and runs it from there.
set -euo pipefail
cd "$(dirname "$0")/.."

LAYER_URL="${1:-memory://}"
PROFILE="${AUTOBAHN_PROFILE:-dev}"
TOOLS=target/autobahn-tools
mkdir -p "$TOOLS" reports/autobahn

wstest_py3() {
  "$TOOLS/venv/bin/wstest" "$@"
}

wstest_py2() {
  "$PY2" -c "import site, sys; site.addsitedir('$TOOLS/py2'); sys.argv = ['wstest'] + sys.argv[1:]; from autobahntestsuite.wstest import run; run()" "$@"
}

WSTEST=""
if [ ! -x "$TOOLS/venv/bin/wstest" ]; then
  { python3 -m venv "$TOOLS/venv" && "$TOOLS/venv/bin/pip" install -q autobahntestsuite; } > reports/autobahn/pip3.log 2>&1 || true
fi
if [ -x "$TOOLS/venv/bin/wstest" ] && wstest_py3 --help >/dev/null 2>&1; then
  WSTEST=wstest_py3
else
  PY2="$(command -v python2.7 || true)"
  if [ -z "$PY2" ] || ! "$PY2" -c 'import sys' >/dev/null 2>&1; then
    PY2="$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/2.7*/bin/python 2>/dev/null | head -n1 || true)"
  fi
  if [ -z "$PY2" ]; then
    echo "autobahntestsuite needs Python 2.7 (its wstest does not run on Python 3); none found" >&2
    exit 2
  fi
  if ! wstest_py2 --help >/dev/null 2>&1; then
    "$PY2" -m pip install -q --disable-pip-version-check --target "$TOOLS/py2" autobahntestsuite \
      > reports/autobahn/pip.log 2>&1 || { cat reports/autobahn/pip.log >&2; exit 2; }
  fi
  WSTEST=wstest_py2
fi

if [ "$PROFILE" = release ]; then
  cargo build -q --release --example echo_server
  BIN=target/release/examples/echo_server
else
  cargo build -q --example echo_server
  BIN=target/debug/examples/echo_server
fi

PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$BIN" "$LAYER_URL" "127.0.0.1:$PORT" > reports/autobahn/server.log 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  if python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.2)" 2>/dev/null; then break; fi
  sleep 0.1
done

sed "s/@PORT@/$PORT/" scripts/autobahn/fuzzingclient.json.in > "$TOOLS/fuzzingclient.json"
rm -f reports/autobahn/index.json
timeout 1800 bash -c "$(declare -f wstest_py2 wstest_py3); TOOLS='$TOOLS' PY2='${PY2:-}' $WSTEST -m fuzzingclient -s '$TOOLS/fuzzingclient.json'" > reports/autobahn/wstest.log 2>&1 || true
python3 scripts/autobahn/summary.py reports/autobahn/index.json
