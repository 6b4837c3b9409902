"""A channels_redis 4.x peer driven by tests/python_interop.rs over stdin/stdout, one JSON object
per line.

Usage: peer.py REDIS_URL [LIFETIME_SECONDS]

It builds one `RedisChannelLayer(hosts=[REDIS_URL])` with every default (prefix "asgi",
expiry 60, capacity 100; symmetric_encryption_keys from $SWITCHYARD_PEER_KEYS, a JSON list, when
set), so it behaves like a Django project pointed at the same Redis. Its
first line is {"ready": true, ...}. Then each request line {"id": N, "op": ..., ...} gets one
reply line {"id": N, "ok": true, "result": ...} or {"id": N, "ok": false, "error": "..."}.
Requests run concurrently, so a test can start a `receive` and send while it waits.

Ops: send(channel, message), group_send(group, message), group_add(group, channel),
group_discard(group, channel), new_channel(prefix?), receive(channel, timeout), quit.

Messages cross the pipe as JSON in which bytes are {"$hex": "..."}; everything else maps to
itself (str, int, float, bool, None, list, dict). The peer exits on EOF, on `quit`, or when its
lifetime (default 20 s) runs out, so a stuck test never leaves it behind.
"""

import asyncio
import json
import os
import sys
import traceback


def encode(value):
    """Python message value -> JSON value ({"$hex"} for bytes)."""
    if isinstance(value, (bytes, bytearray)):
        return {"$hex": bytes(value).hex()}
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


def decode(value):
    """JSON value -> Python message value (bytes from {"$hex"})."""
    if isinstance(value, dict):
        if len(value) == 1 and "$hex" in value:
            return bytes.fromhex(value["$hex"])
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def emit(obj):
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


async def handle(layer, request):
    op = request["op"]
    if op == "send":
        await layer.send(request["channel"], decode(request["message"]))
        return None
    if op == "group_send":
        await layer.group_send(request["group"], decode(request["message"]))
        return None
    if op == "group_add":
        await layer.group_add(request["group"], request["channel"])
        return None
    if op == "group_discard":
        await layer.group_discard(request["group"], request["channel"])
        return None
    if op == "new_channel":
        return await layer.new_channel(request.get("prefix", "specific"))
    if op == "receive":
        timeout = float(request.get("timeout", 10))
        try:
            message = await asyncio.wait_for(layer.receive(request["channel"]), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"nothing on {request['channel']!r} within {timeout} s") from None
        return encode(message)
    raise ValueError(f"unknown op {op!r}")


async def serve(layer, request):
    rid = request.get("id")
    try:
        result = await handle(layer, request)
        emit({"id": rid, "ok": True, "result": result})
    except Exception as e:  # reported to the test, which fails with it
        emit({"id": rid, "ok": False, "error": f"{type(e).__name__}: {e}",
              "traceback": traceback.format_exc()})


async def main():
    url = sys.argv[1]
    lifetime = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
    loop = asyncio.get_running_loop()
    # A watchdog that does not depend on the event loop being healthy.
    loop.call_later(lifetime, lambda: (sys.stderr.write(f"peer.py: lifetime of {lifetime} s over\n"), os._exit(3)))

    from importlib.metadata import version
    from channels_redis.core import RedisChannelLayer

    # $SWITCHYARD_PEER_KEYS: a JSON list of symmetric_encryption_keys (absent: no encryption).
    keys = json.loads(os.environ.get("SWITCHYARD_PEER_KEYS") or "null")
    layer = RedisChannelLayer(hosts=[url], symmetric_encryption_keys=keys)
    emit({
        "ready": True,
        "encrypted": bool(keys),
        "client_prefix": layer.client_prefix,
        "prefix": layer.prefix,
        "versions": {p: version(p) for p in ("channels-redis", "channels", "redis", "msgpack")},
        "python": sys.version.split()[0],
    })

    tasks = set()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            # EOF: finish what was asked (each op is bounded), then leave.
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            break
        line = line.strip()
        if not line:
            continue
        request = json.loads(line)
        if request.get("op") == "quit":
            for task in tasks:
                task.cancel()
            emit({"id": request.get("id"), "ok": True, "result": None})
            break
        task = asyncio.create_task(serve(layer, request))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sys.stdout.flush()
    os._exit(0)  # the stdin reader thread must not keep the process alive


if __name__ == "__main__":
    asyncio.run(main())
