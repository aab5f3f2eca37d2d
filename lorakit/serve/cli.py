"""``lorakit serve``: load a base model, register adapters in an :class:`~lorakit.pool.AdapterPool`, run the
engine and the OpenAI-compatible API with uvicorn.

    lorakit serve --adapter pos=runs/pos --adapter neg=runs/neg --port 8000
    lorakit serve --model path/to/model --allowed-dir adapters/ --max-batch 32 --max-resident 64

FastAPI and uvicorn are imported only here (``pip install lorakit[serve]``).
"""
from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from ..errors import LorakitError
from ..train.model import load_model_on, resolve_model
from .engine import Engine
from .mixtures import WithMixtures, load_served_mixture


def serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="transformers model folder or .gguf file (default: the embedded "
                                        "SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="auto (default: the GPU when there is one), cpu, cuda, "
                                                         "cuda:<index> or mps")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="load the base model in bfloat16; default: on a GPU with fast bf16, float32 elsewhere")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="register an adapter folder (PEFT or lorakit format) under NAME; repeatable")
    parser.add_argument("--mixture", action="append", default=[], metavar="NAME=PATH",
                        help="serve a mixture folder (lorakit.mixtures.save_mixture, a gate router over its experts) "
                             "as model NAME; repeatable")
    parser.add_argument("--allowed-dir", help="folder that POST /v1/load_lora_adapter may load from (default: "
                                              "runtime loading disabled)")
    parser.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every endpoint (default: $LORAKIT_API_KEY; "
                             "none: no authentication)")
    parser.add_argument("--served-model-name", help="the base model's name in the API (default: its folder name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (printed when ready)")
    parser.add_argument("--max-batch", type=int, default=32, help="most requests decoded together")
    parser.add_argument("--max-waiting", type=int, default=256, help="queue bound; more requests get 429")
    parser.add_argument("--max-resident", type=int, default=64, help="adapters attached to the model at once")
    parser.add_argument("--max-registered", type=int, default=256,
                        help="adapters registered at once (kept in host memory); more loads are refused")
    parser.add_argument("--context", type=int, help="most tokens per request (default: the model's)")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="decode with static shapes replayed from CUDA graphs when every row's adapter is in the "
                             "pool's slots (default: on a GPU)")
    parser.add_argument("--log-level", default="warning")


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LorakitError(f"{spec!r} is invalid: write NAME=PATH")
        pairs.append((name, path))
    return pairs


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..pool import AdapterPool
    from .server import create_app

    model, tokenizer = load_model_on(args.model, args.device, args.bf16)
    pool = AdapterPool(model, capacity=args.max_resident, max_registered=args.max_registered)
    for name, path in parse_adapter_specs(args.adapter):
        pool.register(name, path)
    mixtures = {name: load_served_mixture(model, name, path) for name, path in parse_adapter_specs(args.mixture)}
    adapters = WithMixtures(pool, mixtures) if mixtures else pool
    engine = Engine(model, tokenizer, adapters, max_batch=args.max_batch, max_waiting=args.max_waiting,
                    context=args.context, graphs=args.graphs)
    base_name = args.served_model_name or Path(resolve_model(args.model)).name
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)  # connections queue from now on, so "ready" below is true
    port = sock.getsockname()[1]
    ready = lambda: print(f"lorakit serve: ready on http://{args.host}:{port}/v1 (model {base_name!r}, "
                          f"{len(pool.names())} adapters, {len(mixtures)} mixtures)", flush=True)
    app = create_app(engine, base_name, allowed_dir=args.allowed_dir, on_ready=ready, api_key=args.api_key)
    uvicorn.Server(uvicorn.Config(app, log_level=args.log_level)).run(sockets=[sock])
    return 0
