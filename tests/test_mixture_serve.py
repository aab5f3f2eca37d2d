"""``lorakit serve --mixture``: a gate-router mixture served as a model name, beside plain adapters and the base
model in the same continuous batch, each request equal to its solo ``generate``."""
from __future__ import annotations

import pytest
import torch
import zoo
from test_engine import model_with_adapters, reference, run, tiny_tokenizer, tokens

import lorakit
from lorakit.errors import LorakitError
from lorakit.mixtures.block import add_expert_blocks
from lorakit.mixtures.files import save_mixture
from lorakit.pool import AdapterPool
from lorakit.serve.engine import Engine
from lorakit.serve.mixtures import WithMixtures, load_served_mixture
from lorakit.serve.sampling import SamplingParams

EXPERTS = ["e0", "e1", "e2"]


def mixture_source(tmp_path):
    model = model_with_adapters(names=(*EXPERTS, "a"))
    router = lorakit.add_router(model, "gate", lorakit.gate_router(model, EXPERTS, top_k=2))
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 2.0, generator=torch.Generator().manual_seed(0))
    save_mixture(model, tmp_path / "moe", "gate", EXPERTS)
    lorakit.save_adapter(model, tmp_path / "a", "a")
    return model, router


def mixed_reference(model, router, prompt: list[int], max_tokens: int) -> list[int]:
    with torch.no_grad(), lorakit.mix(model, EXPERTS, router):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_a_served_mixture_equals_its_solo_generate_beside_adapters_and_the_base(tmp_path):
    source, router = mixture_source(tmp_path)
    tok = tiny_tokenizer()
    pool = AdapterPool(zoo.tiny_llama(), capacity=2)
    pool.register("a", tmp_path / "a")
    served = WithMixtures(pool, {"moe": load_served_mixture(pool.model, "moe", tmp_path / "moe")})
    assert sorted(served.names()) == ["a", "moe"]
    jobs = [(tok(p).input_ids, a, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
            for p, a in [("one", "moe"), ("two", "a"), ("three", None), ("four", "moe"), ("five", "a")]]
    outs = run(Engine(pool.model, tok, served, max_batch=4), jobs)
    for out, (prompt, adapter, _) in zip(outs, jobs):
        expected = (mixed_reference(source, router, prompt, 6) if adapter == "moe"
                    else reference(source, prompt, adapter, 6, True))
        assert tokens(out) == expected, adapter
    assert mixed_reference(source, router, jobs[0][0], 6) != reference(source, jobs[0][0], None, 6, True)


def test_unservable_mixtures_and_name_clashes_are_refused(tmp_path):
    mixture_source(tmp_path)
    pool = AdapterPool(zoo.tiny_llama(), capacity=2)
    pool.register("a", tmp_path / "a")
    with pytest.raises(LorakitError, match="both an adapter and a mixture"):
        WithMixtures(pool, {"a": load_served_mixture(pool.model, "a", tmp_path / "moe")})
    served = WithMixtures(pool, {})
    served.mixtures["moe"] = None  # a name the server already serves as a mixture
    with pytest.raises(LorakitError, match="served mixture"):
        served.register("moe", tmp_path / "a")
    with pytest.raises(LorakitError, match="cannot be unloaded"):
        served.unregister("moe")
    blocks = zoo.tiny_llama()
    add_expert_blocks(blocks, "ffn", lorakit.LoraConfig(r=2, targets=["up_proj"]), 2, top_k=1)
    save_mixture(blocks, tmp_path / "blocks", "ffn")
    with pytest.raises(LorakitError, match="FFN expert blocks"):
        load_served_mixture(zoo.tiny_llama(), "ffn", tmp_path / "blocks")


def test_lorakit_serve_serves_a_mixture_by_name(tmp_path):
    import os
    import subprocess
    import sys

    import openai
    from test_server import _read_until_ready

    source, router = mixture_source(tmp_path)
    tok = tiny_tokenizer()
    zoo.tiny_llama().save_pretrained(tmp_path / "model")  # the same seed: the same base weights as ``source``'s
    tok.save_pretrained(tmp_path / "model")
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", str(tmp_path / "model"), "--served-model-name",
           "tiny", "--mixture", f"moe={tmp_path / 'moe'}", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        port = _read_until_ready(proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        assert {m.id for m in client.models.list().data} == {"tiny", "moe"}
        prompt = tok("hello").input_ids
        reply = client.completions.create(model="moe", prompt=prompt, max_tokens=5, temperature=0.0,
                                          extra_body={"ignore_eos": True})
        expected = tok.decode(mixed_reference(source, router, prompt, 5), skip_special_tokens=True)
        assert reply.choices[0].text == expected
    finally:
        proc.terminate()
        proc.wait(timeout=30)
