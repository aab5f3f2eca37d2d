"""A non-streaming request whose client went away is aborted (its batch slot freed), and one whose outputs arrive
across several waits loses none of them."""
from __future__ import annotations

import asyncio

import lorakit.serve.server as server
from lorakit.serve.engine import Output


class Engine:
    def __init__(self) -> None:
        self.aborted: list[object] = []

    def abort(self, request: object) -> None:
        self.aborted.append(request)


def run(coro):
    return asyncio.run(coro)


def test_an_abandoned_request_is_aborted(monkeypatch):
    monkeypatch.setattr(server, "DISCONNECT_POLL_S", 0.01)
    engine, polls = Engine(), []

    async def disconnected() -> bool:
        polls.append(1)
        return len(polls) >= 2  # the client leaves while the request waits for its first token

    assert run(server.collect(engine, "req", asyncio.Queue(), disconnected)) is None
    assert engine.aborted == ["req"] and len(polls) == 2


def test_outputs_arriving_between_polls_are_all_collected(monkeypatch):
    monkeypatch.setattr(server, "DISCONNECT_POLL_S", 0.01)
    engine = Engine()

    async def scenario() -> list[Output]:
        queue: asyncio.Queue = asyncio.Queue()
        items = iter([Output(str(i), [i], reason) for i, reason in enumerate([None, None, "length"])])

        async def connected() -> bool:  # asked after each timed-out wait: the next output arrives only then
            queue.put_nowait(next(items))
            return False

        return await server.collect(engine, "req", queue, connected)

    outputs = run(scenario())
    assert [o.token_ids for o in outputs] == [[0], [1], [2]] and not engine.aborted


def test_an_unexpected_error_is_an_openai_shaped_500():
    from fastapi.testclient import TestClient

    from lorakit.serve.server import create_app

    class Broken:
        def __call__(self, text):
            raise RuntimeError("tokenizer exploded")

    class FakeEngine:
        tokenizer = Broken()

    client = TestClient(create_app(FakeEngine(), "base"), raise_server_exceptions=False)
    reply = client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2})
    assert reply.status_code == 500
    assert reply.json()["error"]["type"] == "server_error" and "tokenizer exploded" in reply.json()["error"]["message"]
