#!/usr/bin/env python3
"""A bounded load test of `caldera serve` (SmolLM2-135M-Instruct, CPU backend, 4 slots):
N requests (default 500) at concurrency C (default 32) with tiny max_tokens, a mix of
chat, streamed chat, completions, streams the client hangs up on midway, chats that
share a long system prompt (agents resending it: the prefix cache), and prompts longer
than a slot's context. Passes when no request got a 5xx (or a transport error), every
over-long prompt got a 400, all slots are idle and the queue empty at the end, the free
KV pages are back to their starting count (/metrics), the shared prefix was reused, and
the server's RSS grew by less than --rss-mib (measured after a warm-up).

Needs `pip install httpx` (the openai SDK depends on it) and a built binary
(`cargo build -p caldera`; CALDERA_BIN overrides target/debug/caldera).
Ends with "N passed, M failed"; exit code 1 on failure.
"""

import argparse
import asyncio
import collections
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_harness  # noqa: E402

import httpx  # noqa: E402

CTX = 512
TOPICS = ["the sea", "a robot", "Paris", "winter", "a cat", "mountains", "tea", "the moon"]
# About 150 tokens: several whole KV pages that every "shared" request starts with.
SYSTEM = (
    "You are the support agent of a small ferry company that links three islands, North "
    "Rock, Gull Bay and Long Sands, with the mainland port of Easthaven. Ferries leave "
    "every two hours from six in the morning to ten at night, bicycles travel free, cars "
    "need a reservation, and dogs must stay on a lead on the open deck. Tickets can be "
    "changed up to one hour before departure without a fee. When the sea is rough the "
    "last crossing may be cancelled; passengers then get a full refund or a seat on the "
    "first morning ferry. Answer in one short, friendly sentence and never invent "
    "timetables, prices or names that are not given here."
)


def kind_of(i, rng):
    r = rng.random()
    if r < 0.30:
        return "chat"
    if r < 0.40:
        return "shared"
    if r < 0.60:
        return "stream"
    if r < 0.72:
        return "completion"
    if r < 0.86:
        return "cancel"
    return "too_long"


async def one(client, i, kind, rng, stats):
    topic = TOPICS[i % len(TOPICS)]
    msgs = [{"role": "user", "content": f"Write one sentence about {topic}. ({i})"}]
    body = {"messages": msgs, "max_tokens": rng.randint(1, 3), "temperature": 0.7, "seed": i}
    path = "/v1/chat/completions"
    if kind == "shared":
        msgs.insert(0, {"role": "system", "content": SYSTEM})
    elif kind == "completion":
        path = "/v1/completions"
        body = {"prompt": f"A story about {topic}:", "max_tokens": 2, "temperature": 0}
    elif kind == "too_long":
        body["messages"][0]["content"] = "word " * (CTX + 50)
    elif kind in ("stream", "cancel"):
        body["stream"] = True
        if kind == "cancel":
            body["max_tokens"] = 64
    try:
        if body.get("stream"):
            async with client.stream("POST", path, json=body) as r:
                stats[(kind, r.status_code)] += 1
                if r.status_code != 200:
                    await r.aread()
                    return
                n = 0
                done = False
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    if '"error"' in data:
                        stats[(kind, "stream_error")] += 1
                        return
                    n += 1
                    if kind == "cancel" and n >= 2:
                        # Hang up midway: leaving the block closes the connection.
                        return
                if kind == "stream" and not done:
                    stats[(kind, "no_done")] += 1
        else:
            r = await client.post(path, json=body)
            stats[(kind, r.status_code)] += 1
            if r.status_code == 400 and kind == "too_long":
                err = r.json()["error"]
                if err.get("code") != "context_length_exceeded" or str(CTX) not in err["message"]:
                    stats[(kind, "bad_400_body")] += 1
            elif r.status_code == 200:
                json.loads(r.text)
    except (httpx.HTTPError, OSError) as e:
        stats[(kind, f"transport:{type(e).__name__}")] += 1


async def run_load(base, n, concurrency, seed):
    rng = random.Random(seed)
    kinds = [kind_of(i, rng) for i in range(n)]
    stats = collections.Counter()
    queue = asyncio.Queue()
    for i, k in enumerate(kinds):
        queue.put_nowait((i, k))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:

        async def worker():
            while True:
                try:
                    i, k = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await one(client, i, k, random.Random(i), stats)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return kinds, stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--rss-mib", type=float, default=48.0, help="largest RSS growth allowed")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kv-pages", type=int, help="KV pages of the pool (default: slots x ctx)")
    a = ap.parse_args()
    binary = serve_harness.default_binary()
    model = serve_harness.model_path()
    serve_harness.require(binary, "caldera binary (cargo build -p caldera)")
    serve_harness.require(model, "model (scripts/fetch-models.sh)")
    log = open(os.environ.get("CALDERA_SERVE_LOG", os.devnull), "w")
    # The queue holds every client beyond the slots, so no request should see a 503.
    srv = serve_harness.Server(
        binary,
        model,
        ["--slots", str(a.slots), "--ctx", str(CTX), "--max-queue", str(a.concurrency)]
        + (["--kv-pages", str(a.kv_pages)] if a.kv_pages else []),
        log=log,
    )
    failures = []
    passed = 0

    def metric(text, name):
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    try:
        pages0 = metric(srv.get("/metrics"), "caldera_kv_pages_free")
        # Warm-up: allocations that stay (thread-local scratch, first KV pages touched).
        asyncio.run(run_load(srv.base, 2 * a.concurrency, a.concurrency, a.seed + 1))
        rss0 = srv.rss_kib()
        t0 = time.time()
        kinds, stats = asyncio.run(run_load(srv.base, a.requests, a.concurrency, a.seed))
        took = time.time() - t0
        # Hung-up streams leave their slots within a step; give the scheduler a moment.
        deadline = time.time() + 10
        while True:
            slots = srv.get("/slots")
            health = srv.get("/health")
            if all(s["state"] == "idle" for s in slots) and health["queued"] == 0:
                break
            if time.time() > deadline:
                break
            time.sleep(0.05)
        rss1 = srv.rss_kib()
        metrics = srv.get("/metrics")

        counts = collections.Counter(kinds)
        print(f"{a.requests} requests at concurrency {a.concurrency} on {a.slots} slots in {took:.1f} s "
              f"({a.requests / took:.1f} req/s): {dict(counts)}")
        print("outcomes:", dict(sorted(((f"{k}:{s}", v) for (k, s), v in stats.items()))))
        print(f"RSS {rss0 / 1024:.1f} MiB after warm-up, {rss1 / 1024:.1f} MiB after the run")
        for line in metrics.splitlines():
            if line.startswith(("caldera_generations_", "caldera_prefix_cache_", "caldera_prompt_tokens_total",
                                "caldera_generated_tokens_total", "caldera_requests_total",
                                "caldera_kv_")):
                print("  ", line)

        def check(name, ok, detail=""):
            nonlocal passed
            if ok:
                passed += 1
                print(f"ok   {name}")
            else:
                failures.append(name)
                print(f"FAIL {name} {detail}")

        bad = {k: v for k, v in stats.items() if not (isinstance(k[1], int) and k[1] < 500)}
        check("no 5xx, transport or stream errors", not bad, bad)
        check(
            "every over-long prompt got 400 with the token counts",
            stats[("too_long", 400)] == counts["too_long"] and not stats[("too_long", "bad_400_body")],
        )
        ok_kinds = ("chat", "shared", "stream", "completion", "cancel")
        check("every other request got 200", all(stats[(k, 200)] == counts[k] for k in ok_kinds))
        check("all slots idle, queue empty", all(s["state"] == "idle" for s in slots) and health["queued"] == 0,
              (slots, health))
        pages1 = metric(metrics, "caldera_kv_pages_free")
        check(f"free KV pages back to their starting count ({pages1:.0f} of {pages0:.0f})",
              pages1 == pages0 == metric(metrics, "caldera_kv_pages_total"))
        reused = metric(metrics, "caldera_prefix_cache_reused_tokens_total")
        check(f"the shared system prompt was reused ({reused:.0f} tokens)",
              counts["shared"] == 0 or reused >= 64 * min(counts["shared"], 10))
        growth = (rss1 - rss0) / 1024
        check(f"RSS growth {growth:.1f} MiB < {a.rss_mib} MiB", growth < a.rss_mib)
    finally:
        code = srv.stop()
    if code not in (0, None):
        failures.append("clean exit")
        print(f"FAIL caldera serve exited with {code} on SIGTERM")
    print(f"{passed} passed, {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
