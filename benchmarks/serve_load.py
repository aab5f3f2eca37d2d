"""Load test of ``lorakit serve``: a burst at twice its measured capacity, with adapters loaded and unloaded during
it. Every accepted request must complete, every refusal must be a 429 with ``Retry-After``, and the server must stay
healthy; the p50 / p99 latency of accepted requests is reported.

The server runs the tiny Llama of ``tiny_run.py`` on this machine's loopback (4 adapters registered, a fifth loaded
and unloaded every second through ``/v1/load_lora_adapter``). Capacity is measured first with ``--clients`` closed-loop
clients; the burst then sends requests open-loop (a new one every ``1 / (2 x capacity)`` seconds, whatever the
answers) for ``--seconds``.

    python benchmarks/serve_load.py --seconds 60
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from tiny_run import make_model_folder

import lorakit

ADAPTERS = ["a", "b", "c", "d"]


def save_adapters(model_dir: Path, root: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for name in [*ADAPTERS, "extra"]:
        torch.manual_seed(len(name) + ord(name[0]))
        lorakit.adapt(model, lorakit.LoraConfig(r=4, targets="all-linear", init="random"), name, activate=False)
        lorakit.save_adapter(model, root / name, name)


def start_server(model_dir: Path, adapters: Path, max_waiting: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", str(model_dir), "--served-model-name", "tiny",
           "--port", "0", "--max-batch", "8",
           "--max-waiting", str(max_waiting), "--max-resident", "4", "--allowed-dir", str(adapters),
           *[a for name in ADAPTERS for a in ("--adapter", f"{name}={adapters / name}")]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if "ready on http://" in line:
            return proc, line.split("ready on ")[1].split("/v1")[0]
    raise RuntimeError("the server exited before it was ready")


def body(rng: random.Random) -> dict:
    return {"model": rng.choice(ADAPTERS + ["tiny"]), "prompt": "the flight was very", "max_tokens": 16,
            "temperature": 0.0, "ignore_eos": True}


async def capacity(client: httpx.AsyncClient, clients: int, seconds: float) -> float:
    """Completed requests per second with ``clients`` closed-loop clients."""
    done, deadline, rng = [0], time.perf_counter() + seconds, random.Random(1)

    async def loop() -> None:
        while time.perf_counter() < deadline:
            reply = await client.post("/v1/completions", json=body(rng))
            done[0] += reply.status_code == 200

    await asyncio.gather(*(loop() for _ in range(clients)))
    return done[0] / seconds


async def churn(client: httpx.AsyncClient, adapters: Path, stop: asyncio.Event, counts: dict) -> None:
    """Load and unload adapter 'extra' every second while the burst runs."""
    while not stop.is_set():
        load = await client.post("/v1/load_lora_adapter", json={"lora_name": "extra",
                                                                 "lora_path": str(adapters / "extra")})
        counts["loads"] += load.status_code == 200
        await asyncio.sleep(0.5)
        unload = await client.post("/v1/unload_lora_adapter", json={"lora_name": "extra"})
        counts["unloads"] += unload.status_code == 200
        await asyncio.sleep(0.5)


async def burst(client: httpx.AsyncClient, rate: float, seconds: float, adapters: Path) -> dict:
    rng, latencies, counts = random.Random(2), [], {"ok": 0, "429": 0, "429 without Retry-After": 0, "other": 0,
                                                    "loads": 0, "unloads": 0}

    async def one() -> None:
        started = time.perf_counter()
        reply = await client.post("/v1/completions", json=body(rng))
        if reply.status_code == 200:
            counts["ok"] += 1
            latencies.append(time.perf_counter() - started)
        elif reply.status_code == 429:
            counts["429" if "retry-after" in reply.headers else "429 without Retry-After"] += 1
        else:
            counts["other"] += 1

    stop = asyncio.Event()
    churner = asyncio.ensure_future(churn(client, adapters, stop, counts))
    tasks, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        tasks.append(asyncio.ensure_future(one()))
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*tasks)
    stop.set()
    await churner
    counts["sent"] = len(tasks)
    counts["p50_s"] = statistics.median(latencies) if latencies else float("nan")
    counts["p99_s"] = statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 100 else max(latencies,
                                                                                                  default=0)
    return counts


async def main_async(args: argparse.Namespace, url: str, adapters: Path) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=1000)) as client:
        rate = await capacity(client, args.clients, args.measure)
        print(f"capacity: {rate:.1f} requests/s with {args.clients} closed-loop clients (16 tokens each)")
        result = await burst(client, 2 * rate, args.seconds, adapters)
        health = (await client.get("/health")).json()["status"]
    print(f"burst at {2 * rate:.1f} requests/s for {args.seconds:.0f} s: sent {result['sent']}, completed "
          f"{result['ok']}, refused 429 {result['429']} (without Retry-After: {result['429 without Retry-After']}), "
          f"other answers {result['other']}; adapter loads {result['loads']}, unloads {result['unloads']}")
    print(f"latency of completed requests: p50 {result['p50_s'] * 1e3:.0f} ms, p99 {result['p99_s'] * 1e3:.0f} ms; "
          f"/health after: {health}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--measure", type=float, default=10, help="seconds of the capacity measurement")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-waiting", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_model_folder(root / "model")
        save_adapters(model_dir, root / "adapters")
        proc, url = start_server(model_dir, root / "adapters", args.max_waiting)
        try:
            asyncio.run(main_async(args, url, root / "adapters"))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        print(f"server exit code after SIGTERM: {proc.returncode}")


if __name__ == "__main__":
    main()
