# Sourced by the bench scripts: the "every edge check on" profile. `serve` checks the Host
# against a list, the Origin against a list (refusing handshakes without one), requires an HS256
# JWT on every /ws/ path, and applies the per-client limits to loopback clients too, with rate
# limits high enough that no frame is ever delayed (so the limiter's cost per frame is measured,
# not its delays). The load client sends the allowed Origin and a valid token (a day's expiry).
#
#   EDGE_SERVE_FLAGS   flags for `switchyard serve`
#   EDGE_CLIENT_FLAGS  flags for `switchyard bench <mode>` (needs `--header`)
#
# EDGE_JWT=off in the environment leaves the token out (hosts, origins and limits only), to
# tell the JWT's share from the rest.

EDGE_SECRET="switchyard-bench-edge-secret"
EDGE_ORIGIN="http://bench.example"

# An HS256 JWT for $EDGE_SECRET, subject "bench", expiring in a day (standard library only).
edge_token() {
  python3 - "$EDGE_SECRET" <<'PY'
import base64, hashlib, hmac, json, sys, time
b64 = lambda d: base64.urlsafe_b64encode(d).rstrip(b"=")
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"sub": "bench", "exp": int(time.time()) + 86400}).encode())
sig = b64(hmac.new(sys.argv[1].encode(), head + b"." + body, hashlib.sha256).digest())
print((head + b"." + body + b"." + sig).decode())
PY
}

EDGE_SERVE_FLAGS=(
  --allowed-hosts 127.0.0.1,localhost
  --allowed-origins "$EDGE_ORIGIN" --refuse-missing-origin
  --limit-loopback
  --ws-messages-per-second 1000000 --ws-message-burst 1000000
  --ws-bytes-per-second 1000000000 --ws-byte-burst 1000000000
)
EDGE_CLIENT_FLAGS=(--header "Origin: $EDGE_ORIGIN")
if [ "${EDGE_JWT:-on}" != off ]; then
  EDGE_SERVE_FLAGS+=(--jwt-secret "$EDGE_SECRET" --auth-required-paths '/ws/*')
  EDGE_CLIENT_FLAGS+=(--header "Authorization: Bearer $(edge_token)")
fi
