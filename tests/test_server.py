"""``lorakit serve`` end to end: a real server process on 127.0.0.1, driven with the official ``openai`` client.

The server's greedy outputs are compared with transformers' ``generate`` on the same weights with the named
adapter active; the error paths (unknown adapter, malformed JSON, path traversal, prompt over the context, a full
queue) get their HTTP status and a clear message, and the server keeps serving afterwards.
"""
from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
import zoo
from test_engine import model_with_adapters, reference, tiny_tokenizer

import lorakit
from lorakit.serve.engine import Engine
from lorakit.serve.server import create_app


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny Llama + tokenizer, adapters ``a``/``b`` to serve, and ``c`` in the runtime-loadable folder."""
    root = tmp_path_factory.mktemp("serve")
    model, tok = model_with_adapters(names=("a", "b", "c")), tiny_tokenizer()
    for name, folder in [("a", root / "adapters" / "a"), ("b", root / "adapters" / "b"), ("c", root / "allowed" / "c")]:
        lorakit.save_adapter(model, folder, name)
    zoo.tiny_llama().save_pretrained(root / "model")  # the same seed: the same base weights as ``model``'s
    tok.save_pretrained(root / "model")
    return root, model, tok


def _read_until_ready(proc: subprocess.Popen, timeout: float = 180.0) -> int:
    """The port from the server's "ready on" line; fails with the server's output if it exits first."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    while (line := lines.get(timeout=timeout)) is not None:
        seen.append(line)
        if "ready on http://" in line:
            return int(line.split("http://127.0.0.1:")[1].split("/")[0])
    raise RuntimeError("lorakit serve exited before it was ready:\n" + "".join(seen[-30:]))


@pytest.fixture(scope="module")
def server(files):
    root, model, tok = files
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", str(root / "model"), "--served-model-name", "tiny",
           "--adapter", f"a={root / 'adapters' / 'a'}", "--adapter", f"b={root / 'adapters' / 'b'}",
           "--allowed-dir", str(root / "allowed"), "--port", "0", "--max-batch", "3", "--max-resident", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        port = _read_until_ready(proc)
        yield f"http://127.0.0.1:{port}", openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                                                        max_retries=0, timeout=60)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def expected_text(model, tok, prompt_ids, adapter, n) -> str:
    return tok.decode(reference(model, prompt_ids, adapter, n, True), skip_special_tokens=True)


def test_models_lists_the_base_and_each_adapter_with_its_parent(server):
    _, client = server
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "a", "b"}
    assert cards["tiny"].model_extra["parent"] is None
    assert cards["a"].model_extra["parent"] == "tiny" and cards["b"].model_extra["parent"] == "tiny"


def test_concurrent_completions_with_different_adapters_equal_generate(server, files):
    """Six requests at once over 3 batch slots and 2 resident adapter slots: each equals its solo generate."""
    _, client = server
    _, model, tok = files
    jobs = [("hello", "a"), ("the cat", "b"), ("xyz", "tiny"), ("more text", "a"), ("q", "b"), ("zz top", "tiny")]

    def complete(job):
        prompt, name = job
        return client.completions.create(model=name, prompt=prompt, max_tokens=7, temperature=0,
                                         extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(complete, jobs))
    for (prompt, name), reply in zip(jobs, replies):
        adapter = None if name == "tiny" else name
        assert reply.choices[0].text == expected_text(model, tok, tok(prompt).input_ids, adapter, 7)
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 7


def test_chat_streaming_equals_the_whole_reply(server, files):
    _, client = server
    _, model, tok = files
    messages = [{"role": "user", "content": "hi there"}]
    args = dict(model="b", messages=messages, max_tokens=9, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(stream=True, **args))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False).input_ids
    assert streamed == whole.choices[0].message.content == expected_text(model, tok, prompt, "b", 9)


def test_stop_strings_and_max_tokens(server, files):
    _, client = server
    _, model, tok = files
    full = expected_text(model, tok, tok("stop").input_ids, "a", 16)
    stop = full[5:7]
    reply = client.completions.create(model="a", prompt="stop", max_tokens=16, temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text == full[:full.find(stop)] and reply.choices[0].finish_reason == "stop"


def test_bad_requests_get_clear_errors_and_the_server_stays_up(server, files):
    url, client = server
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="a", prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="context is 64 tokens"):
        client.completions.create(model="a", prompt="y" * 70, max_tokens=2)
    malformed = httpx.post(f"{url}/v1/completions", content=b'{"model": "a", "prompt": ',
                           headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]["message"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_runtime_adapter_loading_is_confined_to_the_allowed_dir(server, files):
    url, client = server
    root, model, tok = files
    outside = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "../adapters/a"})
    assert outside.status_code == 400 and "outside the allowed directory" in outside.json()["error"]["message"]
    absolute = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(root / "model")})
    assert absolute.status_code == 400
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "c"})
    assert loaded.status_code == 200, loaded.text
    assert "c" in {m.id for m in client.models.list().data}
    reply = client.completions.create(model="c", prompt="new", max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text == expected_text(model, tok, tok("new").input_ids, "c", 5)
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c", prompt="new", max_tokens=2)
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 404


def test_metrics_count_requests(server):
    url, client = server
    client.completions.create(model="tiny", prompt="m", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    text = httpx.get(f"{url}/metrics").text
    assert "# TYPE lorakit_requests_finished_total counter" in text
    series = 'lorakit_requests_finished_total{reason="length"}'
    finished = [line for line in text.splitlines() if line.startswith(series)]
    assert finished and float(finished[0].split()[-1]) >= 1
    assert "lorakit_time_to_first_token_seconds_count" in text


def test_full_queue_answers_429_with_retry_after_and_every_accepted_request_completes():
    """With the engine paused, ``max_waiting`` streams are accepted (headers sent), the next is refused with 429;
    once the engine runs again all accepted requests finish."""
    model, tok = model_with_adapters(), tiny_tokenizer()
    engine = Engine(model, tok, max_batch=2, max_waiting=3)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    ready = threading.Event()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, "base", on_ready=ready.set), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert ready.wait(60)
        engine.stop()  # nothing is admitted while stopped: the waiting queue fills
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="none",
                               max_retries=0, timeout=60)
        args = dict(model="a", prompt="wait", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
        streams = [client.completions.create(stream=True, **args) for _ in range(3)]
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(**args)
        assert refused.value.response.headers["retry-after"] == "1"
        engine.start()
        texts = ["".join(c.choices[0].text for c in s) for s in streams]
        assert texts == [expected_text(model, tok, tok("wait").input_ids, "a", 4)] * 3
        assert client.completions.create(**args).choices[0].finish_reason == "length"
    finally:
        srv.should_exit = True
        thread.join(30)


def test_sse_wire_format(server):
    url, _ = server
    body = {"model": "a", "prompt": "sse", "max_tokens": 3, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_cli_rejects_a_bad_adapter_spec():
    from lorakit.serve.cli import parse_adapter_specs

    with pytest.raises(lorakit.LorakitError, match="NAME=PATH"):
        parse_adapter_specs(["just-a-path"])
    assert parse_adapter_specs(["x=/a=b"]) == [("x", "/a=b")]


def test_api_key_guards_every_endpoint_and_runtime_updates_need_the_allowed_dir():
    """Issue 14: no authentication existed, and unloading was not behind the runtime-update switch."""
    from fastapi.testclient import TestClient

    model, tok = model_with_adapters(names=("a",)), tiny_tokenizer()
    app = create_app(Engine(model, tok), "base", api_key="s3cret")
    with TestClient(app) as client:
        for method, path in [("get", "/health"), ("get", "/v1/models"), ("post", "/v1/completions"),
                             ("post", "/v1/unload_lora_adapter"), ("get", "/metrics")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                reply = getattr(client, method)(path, headers=headers)
                assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
        ok = {"Authorization": "Bearer s3cret"}
        assert client.get("/v1/models", headers=ok).status_code == 200
        body = {"model": "a", "prompt": "hi", "max_tokens": 2, "temperature": 0}
        assert client.post("/v1/completions", json=body, headers=ok).json()["choices"][0]["text"] is not None
        unload = client.post("/v1/unload_lora_adapter", json={"lora_name": "a"}, headers=ok)
        assert unload.status_code == 403 and "runtime" in unload.json()["error"]["message"]
        assert "a" in [m["id"] for m in client.get("/v1/models", headers=ok).json()["data"]]
    with pytest.raises(lorakit.LorakitError, match="api_key is empty"):
        create_app(Engine(model, tok), "base", api_key="")
