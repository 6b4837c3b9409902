"""The Python reference point for benches/layer.rs: send + receive throughput of channels_redis
4.3.0 (RedisChannelLayer, all defaults but capacity) on the same kind of ~100-byte message.

Usage: bench_layer.py REDIS_URL [MESSAGES] [PAIRS]
PAIRS sender/receiver pairs, each pair on its own channel, in one process and one event loop
(as a Django worker process runs). Prints one JSON line. Bounded: gives up after 120 s.
"""

import asyncio
import json
import sys
import time

from channels_redis.core import RedisChannelLayer


def message(seq):
    return {
        "type": "chat.message",
        "room": "lobby",
        "seq": seq,
        "text": "the quick brown fox jumps over the lazy dog, 0123456789",
    }


async def main():
    url = sys.argv[1]
    total = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    pairs = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    per_pair = total // pairs
    layer = RedisChannelLayer(hosts=[url], capacity=total + 1)
    await layer.flush()

    async def sender(channel):
        for seq in range(per_pair):
            await layer.send(channel, message(seq))

    async def receiver(channel):
        for _ in range(per_pair):
            await layer.receive(channel)

    start = time.perf_counter()
    cpu = time.process_time()
    tasks = []
    for pair in range(pairs):
        channel = f"bench.py{pair}"
        tasks += [sender(channel), receiver(channel)]
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    await layer.flush()
    print(json.dumps({
        "bench": "channels_redis", "messages": per_pair * pairs, "pairs": pairs,
        "elapsed_ms": round(elapsed * 1000), "msgs_per_sec": round(per_pair * pairs / elapsed),
        "client_cpu_secs_per_million": round(cpu * 1e6 / (per_pair * pairs), 1),
    }))


if __name__ == "__main__":
    asyncio.run(main())
