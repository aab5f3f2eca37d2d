"""The continuous-batching engine (lorakit.serve.engine): a request's output in a mixed, changing batch equals the
same request generated alone by transformers' ``generate`` with its adapter active (S-LoRA, METHODS.md entry 65)."""
from __future__ import annotations

import pytest
import torch
import zoo
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import lorakit
from lorakit.serve.adapters import UnknownAdapterError
from lorakit.serve.engine import Engine, Output, QueueFullError, RequestError
from lorakit.serve.sampling import SamplingParams, TextStream

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?'-:;\n\"#$%&()*+/<=>@[]^_{}"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character tokenizer whose 96 tokens match ``zoo.tiny_llama``'s vocabulary (EOS = 2, as its config)."""
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*SPECIALS, *CHARS])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    return tokenizer


def model_with_adapters(make=zoo.tiny_llama, names=("a", "b", "c")) -> torch.nn.Module:
    model = make()
    for name in names:
        lorakit.adapt(model, lorakit.LoraConfig(r=4, targets="all-linear"), name, activate=False)
    zoo.perturb(model, 0.5)  # adapters far from zero: a routing mistake changes the tokens
    return model


def reference(model, prompt: list[int], adapter: str | None, max_tokens: int, ignore_eos: bool) -> list[int]:
    """Greedy tokens of ``prompt`` alone, by transformers' generate with the adapter (or none) active."""
    eos = {} if not ignore_eos else {"eos_token_id": None}
    ids = torch.tensor([prompt])
    if adapter is None:
        with lorakit.disable(model):
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, **eos)
    else:
        lorakit.set_active(model, adapter)
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, **eos)
    return out[0, len(prompt):].tolist()


def run(engine: Engine, jobs, stagger: bool = True) -> list[list[Output]]:
    """Submit ``jobs`` = (prompt ids, adapter, params), one per step when ``stagger``, and run until all finish."""
    outs: list[list[Output]] = [[] for _ in jobs]
    for out, (prompt, adapter, params) in zip(outs, jobs):
        engine.submit(prompt, adapter, params, out.append)
        if stagger:
            engine.step()
    while engine.num_running or engine.num_waiting:
        engine.step()
    return outs


def tokens(outs: list[Output]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


@pytest.mark.parametrize("make", [zoo.tiny_llama, zoo.tiny_gpt2], ids=["llama", "gpt2"])
def test_greedy_in_a_mixed_continuous_batch_equals_generate_alone(make):
    """Requests join one per step (max_batch 3 < 7 requests, so some wait), leave at different lengths, and use
    different adapters (and the base model) in the same decode steps; each equals its solo ``generate``."""
    model, tok = model_with_adapters(make), tiny_tokenizer()
    prompts = ["hello there", "The cat sat on", "x", "a much longer prompt than the others", "b", "Zq", "ok then"]
    adapters = ["a", "b", None, "a", "c", "b", None]
    max_tokens = [9, 4, 12, 6, 10, 3, 8]
    eos_off = [True, True, True, False, True, False, True]
    jobs = [(tok(p).input_ids, a, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=off))
            for p, a, n, off in zip(prompts, adapters, max_tokens, eos_off)]
    outs = run(Engine(model, tok, max_batch=3), jobs)
    for out, (prompt, adapter, params) in zip(outs, jobs):
        expected = reference(model, prompt, adapter, params.max_tokens, params.ignore_eos)
        assert tokens(out) == expected, (adapter, prompt)
        assert out[-1].finish_reason == ("length" if len(expected) == params.max_tokens else "stop")
        assert all(o.finish_reason is None for o in out[:-1])


@pytest.mark.parametrize("make", [zoo.tiny_llama, zoo.tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("budget", [10**6, 24], ids=["one-prefill", "chunked"])
def test_requests_prefilled_together_equal_generate_alone(make, budget, monkeypatch):
    """Requests that arrive together are prefilled in left-padded batches (rotary and learned positions both count
    from each prompt's first real token); a request done at its first token never joins the running batch."""
    import lorakit.serve.engine as engine_module

    monkeypatch.setattr(engine_module, "PREFILL_TOKENS", budget)
    model, tok = model_with_adapters(make), tiny_tokenizer()
    prompts = ["a long prompt, padded least", "hi", "mid length", "q", "the last one here"]
    adapters = ["b", None, "a", "c", "a"]
    max_tokens = [6, 5, 1, 7, 4]
    jobs = [(tok(p).input_ids, a, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            for p, a, n in zip(prompts, adapters, max_tokens)]
    chunks = []
    prefill = Engine._prefill
    monkeypatch.setattr(Engine, "_prefill", lambda self, chunk: chunks.append(len(chunk)) or prefill(self, chunk))
    outs = run(Engine(model, tok, max_batch=8), jobs, stagger=False)
    lengths = [len(j[0]) for j in jobs]  # 27, 2, 10, 1, 17: greedy chunks of <= 24 padded tokens
    assert lengths == [27, 2, 10, 1, 17] and chunks == ([5] if budget > 10**5 else [1, 2, 1, 1])
    for out, (prompt, adapter, params) in zip(outs, jobs):
        assert tokens(out) == reference(model, prompt, adapter, params.max_tokens, True), (adapter, prompt)


def test_adapters_do_not_interfere():
    """Changing the batch-mates' adapter weights leaves a request's output unchanged (and the routed adapter
    matters: the same prompt under another adapter differs)."""
    model, tok = model_with_adapters(), tiny_tokenizer()
    prompt = tok("route me").input_ids
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    jobs = [(prompt, "a", greedy), (prompt, "b", greedy), (prompt, "c", greedy)]
    before = run(Engine(model, tok), jobs, stagger=False)
    with torch.no_grad():
        for host in lorakit.inject.hosts(model):
            for p in host.adapters["b"].parameters():
                p.mul_(-3.0)
    after = run(Engine(model, tok), jobs, stagger=False)
    assert tokens(before[0]) == tokens(after[0]) and tokens(before[2]) == tokens(after[2])
    assert tokens(before[1]) != tokens(after[1])
    assert tokens(before[0]) != tokens(before[2])


def test_seeded_sampling_does_not_depend_on_the_batch():
    """A request's sample is drawn from its own seeded generator: alone or among others, the same tokens."""
    model, tok = model_with_adapters(), tiny_tokenizer()
    params = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=7, ignore_eos=True)
    alone = run(Engine(model, tok), [(tok("abc").input_ids, "a", params)])[0]
    others = [(tok(p).input_ids, n, SamplingParams(max_tokens=5, temperature=1.0, seed=i, ignore_eos=True))
              for i, (p, n) in enumerate([("zzz", "b"), ("q", None)])]
    mixed = run(Engine(model, tok), [others[0], (tok("abc").input_ids, "a", params), others[1]])[1]
    assert tokens(alone) == tokens(mixed)
    greedy = reference(model, tok("abc").input_ids, "a", 12, True)
    assert tokens(alone) != greedy  # temperature 1.5 really samples


def test_tiny_top_p_is_greedy():
    """Nucleus sampling with a mass below the top token's probability keeps only that token."""
    model, tok = model_with_adapters(), tiny_tokenizer()
    prompt = tok("nucleus").input_ids
    out = run(Engine(model, tok), [(prompt, "c", SamplingParams(max_tokens=8, top_p=1e-6, seed=1, ignore_eos=True))])
    assert tokens(out[0]) == reference(model, prompt, "c", 8, True)


def test_stop_string_cuts_the_text_and_is_never_streamed():
    model, tok = model_with_adapters(), tiny_tokenizer()
    prompt = tok("stop here").input_ids
    ref = reference(model, prompt, "a", 20, True)
    ref_text = tok.decode(ref, skip_special_tokens=True)
    stop = ref_text[6:8]
    assert len(ref_text) >= 10 and stop
    expected = ref_text[:ref_text.find(stop)]
    out = run(Engine(model, tok), [(prompt, "a", SamplingParams(max_tokens=20, temperature=0.0, stop=("#never",
                                                                 stop), ignore_eos=True))])[0]
    assert "".join(o.text for o in out) == expected
    assert out[-1].finish_reason == "stop"
    shortest = next(k for k in range(len(ref)) if stop in tok.decode(ref[:k], skip_special_tokens=True))
    assert tokens(out) == ref[:shortest]  # stopped at the token that completed the stop string


def test_incremental_text_equals_decoding_everything_at_once():
    """TextStream decodes a few tokens per step; on a byte-level BPE (multi-byte characters split across tokens)
    the streamed pieces add up to the full decode, for real text and for random token ids."""
    from tokenizers import trainers

    corpus = ["Héllo wörld 🙂👍 — naïve café, 東京", "spaces   and\nnew lines ∑∫", "plain ascii text here"] * 20
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=
                                                            pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    rng = torch.Generator().manual_seed(0)
    for ids in [tok(corpus[0] + corpus[1]).input_ids, torch.randint(0, 300, (200,), generator=rng).tolist()]:
        stream = TextStream(tok, ())
        assert "".join(stream.push(t) for t in ids) + stream.finish() == tok.decode(ids)


def test_bounded_queue_refuses_then_every_accepted_request_completes():
    model, tok = model_with_adapters(), tiny_tokenizer()
    engine = Engine(model, tok, max_batch=2, max_waiting=3)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    outs: list[list[Output]] = [[] for _ in range(3)]
    for out in outs:
        engine.submit(tok("q").input_ids, "a", params, out.append)
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.submit(tok("q").input_ids, "a", params, [].append)
    while engine.num_running or engine.num_waiting:
        engine.step()
    assert [o[-1].finish_reason for o in outs] == ["length"] * 3
    assert engine.metrics.counter("requests_rejected_total") == 1


def test_bad_requests_are_refused_with_clear_errors():
    model, tok = model_with_adapters(), tiny_tokenizer()
    engine = Engine(model, tok)
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'nope'"):
        engine.submit([5, 6], "nope", SamplingParams(), print)
    with pytest.raises(RequestError, match="context is 64 tokens"):
        engine.submit([5] * 60, None, SamplingParams(max_tokens=8), print)
    with pytest.raises(RequestError, match=r"integers in \[0, 96\)"):
        engine.submit([5, 96], None, SamplingParams(), print)
    with pytest.raises(lorakit.ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(lorakit.ConfigError, match="at most 4096 characters of stop strings"):
        SamplingParams(stop=("x" * 20_000,) * 16)


def test_adapter_pool_with_fewer_slots_than_adapters_equals_generate(tmp_path):
    """Adapters registered from disk in an AdapterPool of capacity 2 serve 3 adapters: requests whose adapter has no
    free slot wait until one is released, and every output still equals solo generate."""
    from lorakit.pool import AdapterPool

    source, tok = model_with_adapters(), tiny_tokenizer()
    for name in ("a", "b", "c"):
        lorakit.save_adapter(source, tmp_path / name, name)
    pool = AdapterPool(zoo.tiny_llama(), capacity=2)
    for name in ("a", "b", "c"):
        pool.register(name, tmp_path / name)
    jobs = [(tok(p).input_ids, a, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
            for p, a in [("one", "a"), ("two", "b"), ("three", "c"), ("four", None), ("five", "a"), ("six", "c")]]
    outs = run(Engine(pool.model, tok, pool, max_batch=4), jobs)
    for out, (prompt, adapter, params) in zip(outs, jobs):
        assert tokens(out) == reference(source, prompt, adapter, params.max_tokens, True), adapter
    assert all(pool.info(n)["in_use"] == 0 for n in ("a", "b", "c"))


def test_threaded_engine_streams_and_runs_calls_between_steps():
    model, tok = model_with_adapters(), tiny_tokenizer()
    engine = Engine(model, tok)
    engine.start()
    try:
        prompt = tok("thread").input_ids
        out = list(engine.generate(prompt, "b", SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)))
        assert tokens(out) == reference(model, prompt, "b", 6, True)
        assert engine.call(lambda: sorted(engine.adapters.names())) == ["a", "b", "c"]
    finally:
        engine.stop()


def test_a_request_failing_in_prefill_or_decode_finishes_alone_and_releases_once(tmp_path, monkeypatch):
    """Issue 14: one request whose sampling fails (on its first token in the batched prefill, or later in decode)
    finishes once with "error"; the others of its batch complete exactly as alone, and every adapter is released."""
    import lorakit.serve.engine as engine_module
    from lorakit.pool import AdapterPool

    source, tok = model_with_adapters(), tiny_tokenizer()
    for name in ("a", "b"):
        lorakit.save_adapter(source, tmp_path / name, name)
    pool = AdapterPool(zoo.tiny_llama(), capacity=2)
    for name in ("a", "b"):
        pool.register(name, tmp_path / name)
    real = engine_module.sample

    def failing(logits, params, generator):
        if params.seed is not None and len(calls.setdefault(params.seed, [])) >= params.seed - 100:
            raise RuntimeError("probability tensor contains inf, nan or element < 0")
        calls.setdefault(params.seed, []).append(1)
        return real(logits, params, generator)

    calls: dict[int, list[int]] = {}
    monkeypatch.setattr(engine_module, "sample", failing)
    good = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    jobs = [(tok(p).input_ids, a, good) for p, a in [("one", "a"), ("two", "b"), ("three", None), ("four", "a")]]
    jobs.insert(1, (tok("bad").input_ids, "a", SamplingParams(max_tokens=4, temperature=0.0, seed=100)))  # 1st token
    jobs.insert(3, (tok("late").input_ids, "b", SamplingParams(max_tokens=4, temperature=0.0, seed=102)))  # 3rd
    outs = run(Engine(pool.model, tok, pool, max_batch=8), jobs, stagger=False)
    for i, (out, (prompt, adapter, _)) in enumerate(zip(outs, jobs)):
        reasons = [o.finish_reason for o in out if o.finish_reason is not None]
        if i in (1, 3):
            assert reasons == ["error"], i
        else:
            assert reasons == ["length"] and tokens(out) == reference(source, prompt, adapter, 4, True), i
    assert all(pool.info(n)["in_use"] == 0 for n in ("a", "b"))


def test_degenerate_temperature_is_greedy_and_seeds_are_bounded():
    logits = torch.tensor([0.5, 3.0, -1.0])
    assert SamplingParams(temperature=1e-300).greedy
    assert sample_token(logits, SamplingParams(temperature=1e-300)) == 1
    with pytest.raises(lorakit.ConfigError, match=r"seed=1180591620717411303424 is invalid: must be an integer in"):
        SamplingParams(seed=2**70)
    with pytest.raises(lorakit.ConfigError, match="seed"):
        SamplingParams(seed=-1)


def sample_token(logits, params):
    from lorakit.serve.sampling import make_generator, sample

    return sample(logits, params, make_generator(0, logits.device))


def test_the_engine_thread_survives_an_error_outside_a_step_and_keeps_serving(monkeypatch):
    """Issue 14: an exception the step does not handle used to kill the engine thread (later requests hung)."""
    import threading

    model, tok = model_with_adapters(), tiny_tokenizer()
    engine = Engine(model, tok)
    real, failures = engine._run_calls, []

    def broken_once():  # _run_calls runs before the step's own try
        if not failures:
            failures.append(1)
            raise RuntimeError("a bug outside the step's error handling")
        real()

    monkeypatch.setattr(engine, "_run_calls", broken_once)
    engine.start()
    try:
        out: list[Output] = []
        done = threading.Event()
        engine.submit(tok("q").input_ids, "a", SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                      lambda o: (out.append(o), o.finish_reason and done.set()))
        assert done.wait(30) and out[-1].finish_reason == "length" and engine.healthy
    finally:
        engine.stop()
    assert failures and engine.crashes == 1
