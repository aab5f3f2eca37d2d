"""Serving many adapters: ``lorakit serve`` vs a one-request-at-a-time PEFT server, under S-LoRA's workload.

S-LoRA (METHODS.md entry 65, section 7) drives its servers with synthetic traces: each request picks an adapter from
a power-law popularity (``p(i) ~ (i + 1) ** -alpha``), arrivals follow a Gamma process (rate ``R``, coefficient of
variation ``cv``), prompt and output lengths are drawn uniformly from ranges. This script makes ``N`` random rank-8
LoRA adapters (q_proj, v_proj) on the fly, starts ``lorakit serve`` with all of them registered, replays the trace
over HTTP with streaming (to time the first token), then does the same against a baseline server built on PEFT that
serves one request at a time with ``set_adapter`` (adapters loaded on first use, least recently used deleted past
``--max-resident``). Both servers run as separate processes on 127.0.0.1 with ``OMP_NUM_THREADS`` threads.

    python benchmarks/serve.py --model small --adapters 1 64 1000      # random 8-layer Llama (benchmarks/common.py)
    python benchmarks/serve.py --model smollm2 --adapters 1 --requests 16

Every request generates exactly its drawn output length (``ignore_eos``), so both servers do the same work.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


@dataclass
class Trace:
    arrival: float        # seconds after the start
    adapter: int          # index into the adapter list
    prompt: list[int]
    output_len: int


def make_trace(n: int, n_adapters: int, alpha: float, rate: float, cv: float, prompt_range: tuple[int, int],
               output_range: tuple[int, int], vocab: int, seed: int) -> list[Trace]:
    """S-LoRA's synthetic workload: power-law adapter popularity, Gamma inter-arrival times, uniform lengths."""
    rng = np.random.default_rng(seed)
    popularity = (np.arange(n_adapters) + 1.0) ** -alpha
    adapters = rng.choice(n_adapters, size=n, p=popularity / popularity.sum())
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)  # mean 1 / rate, std cv / rate
    arrivals = np.cumsum(gaps) - gaps[0]
    return [Trace(float(t), int(a), rng.integers(100, vocab, size=int(rng.integers(*prompt_range, endpoint=True)))
                  .tolist(), int(rng.integers(*output_range, endpoint=True)))
            for t, a in zip(arrivals, adapters)]


# -- models and adapters ----------------------------------------------------------------------------------
def make_model(kind: str, root: Path) -> Path:
    """A transformers folder: the embedded SmolLM2, or the benchmarks' random Llama with SmolLM2's tokenizer."""
    from lorakit.train.default import default_model_dir

    smol = default_model_dir()
    if kind == "smollm2":
        return smol
    from common import tiny_llama
    from transformers import AutoTokenizer

    folder = root / "model"
    tiny_llama().save_pretrained(folder)
    AutoTokenizer.from_pretrained(smol).save_pretrained(folder)
    return folder


def make_adapters(model_dir: Path, n: int, root: Path, rank: int = 8) -> list[Path]:
    """``n`` rank-``rank`` LoRA folders on q_proj, v_proj with random (non-zero) A and B, in PEFT format."""
    import torch
    from safetensors.torch import load_file, save_file

    import lorakit
    from lorakit.train.model import load_model

    model, _ = load_model(str(model_dir))
    lorakit.adapt(model, lorakit.LoraConfig(r=rank, alpha=2 * rank, targets=["q_proj", "v_proj"]), "template")
    template = root / "template"
    lorakit.save_adapter(model, template, "template")
    shapes = {k: v.shape for k, v in load_file(template / "adapter_model.safetensors").items()}
    gen = torch.Generator().manual_seed(0)
    folders = []
    for i in range(n):
        folder = root / "adapters" / f"lora{i}"
        folder.mkdir(parents=True)
        shutil.copy(template / "adapter_config.json", folder)
        save_file({k: torch.randn(s, generator=gen) * (0.02 if "lora_B" in k else s[-1] ** -0.5)
                   for k, s in shapes.items()}, folder / "adapter_model.safetensors")
        folders.append(folder)
    return folders


# -- servers ----------------------------------------------------------------------------------------------
def start(cmd: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if "ready on http://" in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return proc, line.split("ready on ")[1].split()[0].rstrip("/").removesuffix("/v1")
    raise RuntimeError(f"server exited with {proc.wait()}: {' '.join(cmd[:6])} ...")


def lorakit_cmd(model_dir: Path, adapters: list[Path], args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", str(model_dir), "--port", "0",
           "--max-batch", str(args.max_batch), "--max-resident", str(args.max_resident), "--max-waiting", "100000"]
    for path in adapters:
        cmd += ["--adapter", f"{path.name}={path}"]
    return cmd


def peft_server(args: argparse.Namespace) -> None:
    """The baseline: PEFT, one request at a time, ``set_adapter`` per request (run as ``serve.py peft-server``)."""
    import socket

    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from peft import PeftModel
    from transformers.generation.streamers import BaseStreamer

    from lorakit.train.model import load_model

    base, tokenizer = load_model(args.model)
    folders = {p.name: p for p in Path(args.adapters_root).iterdir()}
    state: dict[str, object] = {"model": None}
    loaded: OrderedDict[str, None] = OrderedDict()
    lock = threading.Lock()

    def use(name: str) -> torch.nn.Module:
        if state["model"] is None:
            state["model"] = PeftModel.from_pretrained(base, folders[name], adapter_name=name).eval()
        model = state["model"]
        if name not in loaded:
            if name not in model.peft_config:
                model.load_adapter(folders[name], adapter_name=name)
            loaded[name] = None
        model.set_adapter(name)
        loaded.move_to_end(name)
        while len(loaded) > args.max_resident:
            model.delete_adapter(loaded.popitem(last=False)[0])
        return model

    class Streamer(BaseStreamer):
        def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
            self.loop, self.queue, self.prompt_seen = loop, queue, False

        def put(self, value: torch.Tensor) -> None:
            if self.prompt_seen:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, value.flatten().tolist())
            self.prompt_seen = True

        def end(self) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    app = FastAPI()

    @app.post("/v1/completions")
    async def complete(body: dict) -> StreamingResponse:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        n = body["max_tokens"]

        def work() -> None:
            with lock, torch.inference_mode():
                use(body["model"]).generate(input_ids=torch.tensor([body["prompt"]]), max_new_tokens=n,
                                            min_new_tokens=n, do_sample=False, streamer=Streamer(loop, queue),
                                            pad_token_id=tokenizer.pad_token_id)

        threading.Thread(target=work, daemon=True).start()

        async def events():
            while (ids := await queue.get()) is not None:
                yield f"data: {json.dumps({'choices': [{'text': tokenizer.decode(ids)}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    print(f"peft server: ready on http://127.0.0.1:{sock.getsockname()[1]}/v1", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


# -- client -----------------------------------------------------------------------------------------------
async def replay(url: str, trace: list[Trace], names: list[str]) -> dict[str, float]:
    """Send every request at its arrival time (streaming); returns throughput and latency percentiles."""
    import httpx

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None)) as client:
        start = time.perf_counter()

        async def one(item: Trace) -> tuple[float, float, float]:
            await asyncio.sleep(max(0.0, item.arrival - (time.perf_counter() - start)))
            sent = time.perf_counter()
            first = None
            body = {"model": names[item.adapter], "prompt": item.prompt, "max_tokens": item.output_len,
                    "temperature": 0, "stream": True, "ignore_eos": True}
            async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code}: {(await response.aread())[:200]}")
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and first is None:
                        first = time.perf_counter()
            done = time.perf_counter()
            return sent, first - sent, done - sent

        results = await asyncio.gather(*(one(item) for item in trace))
    span = max(s + lat for s, _, lat in results) - min(s for s, _, _ in results)
    ttft, latency = [r[1] for r in results], [r[2] for r in results]
    q = lambda xs, p: float(np.percentile(xs, p))
    return {"req_s": len(trace) / span, "tok_s": sum(t.output_len for t in trace) / span,
            "ttft_p50": q(ttft, 50), "ttft_p99": q(ttft, 99), "lat_p50": q(latency, 50), "lat_p99": q(latency, 99),
            "span_s": span}


def run_one(label: str, cmd: list[str], trace: list[Trace], names: list[str], threads: int) -> dict[str, float]:
    t0 = time.perf_counter()
    proc, url = start(cmd, threads)
    startup = time.perf_counter() - t0
    try:
        asyncio.run(replay(url, trace[:2], names))  # warm-up (first-call allocations), not timed
        stats = asyncio.run(replay(url, trace, names))
    finally:
        proc.terminate()
        proc.wait(60)
    stats["startup_s"] = startup
    print(f"{label:<22} " + "  ".join(f"{k} {v:.3f}" for k, v in stats.items()), flush=True)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "peft-server"])
    parser.add_argument("--model", default="small", help="'small' (random 8-layer Llama), 'smollm2', or a folder")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 64, 1000], help="values of N")
    parser.add_argument("--adapters-root", help="(peft-server) folder of adapter folders")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rate", type=float, default=20.0, help="mean arrivals per second")
    parser.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of inter-arrival times")
    parser.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of adapter popularity")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[8, 64])
    parser.add_argument("--output-len", type=int, nargs=2, default=[8, 32])
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-resident", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each server")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.mode == "peft-server":
        return peft_server(args)

    work = Path(tempfile.mkdtemp(prefix="lorakit-serve-bench-"))
    try:
        model_dir = make_model(args.model, work) if args.model in ("small", "smollm2") else Path(args.model)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        all_adapters = make_adapters(model_dir, max(args.adapters), work)
        results = {}
        for n in args.adapters:
            adapters = all_adapters[:n]
            names = [p.name for p in adapters]
            trace = make_trace(args.requests, n, args.alpha, args.rate, args.cv, tuple(args.prompt_len),
                               tuple(args.output_len), vocab, seed=0)
            results[f"lorakit N={n}"] = run_one(f"lorakit N={n}", lorakit_cmd(model_dir, adapters, args), trace,
                                                names, args.threads)
            if not args.no_peft:
                root = work / f"peft{n}"
                root.mkdir()
                for p in adapters:
                    (root / p.name).symlink_to(p)
                cmd = [sys.executable, __file__, "peft-server", "--model", str(model_dir), "--adapters-root",
                       str(root), "--max-resident", str(args.max_resident)]
                results[f"peft N={n}"] = run_one(f"peft N={n}", cmd, trace, names, args.threads)
        first, last = f"lorakit N={args.adapters[0]}", f"lorakit N={args.adapters[-1]}"
        print(f"throughput N={args.adapters[-1]} / N={args.adapters[0]}: "
              f"{results[last]['req_s'] / results[first]['req_s']:.2f}x")
        for n in args.adapters:
            if f"peft N={n}" in results:
                ratio = results[f"lorakit N={n}"]["req_s"] / results[f"peft N={n}"]["req_s"]
                print(f"lorakit / PEFT at N={n}: {ratio:.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
