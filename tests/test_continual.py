"""Continual learning and unlearning (lorakit.continual) on a tiny random Llama and three synthetic keyword tasks."""
from __future__ import annotations

import copy
import functools
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lorakit
from lorakit.continual import LEARNERS, UNLEARNERS, AccuracyMatrix, AdapterSettings, FitSettings, run_sequence
from lorakit.continual.tasks import ContinualTask

pytestmark = pytest.mark.usefixtures("one_thread")

FILLER = {  # besides shared words, each task has its own domain's words, as real tasks do (O3's detector reads them)
    "colour": ["paint", "brush", "canvas", "shade", "hue", "tint"],
    "motion": ["road", "wheel", "speed", "track", "engine", "gear"],
    "animal": ["farm", "barn", "field", "hay", "fence", "stable"],
}
TASKS = {  # task -> label -> keywords deciding it
    "colour": {"red": ["apple", "fire", "blood"], "blue": ["sky", "sea", "ice"]},
    "motion": {"up": ["rise", "climb", "lift"], "down": ["fall", "drop", "sink"]},
    "animal": {"cat": ["meow", "purr", "whisker"], "dog": ["bark", "wag", "fetch"]},
}
SHARED = ["the", "a", "of", "to", "and", "in", "is", "it", "on", "at"]


def tiny_model() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    keywords = [w for labels in TASKS.values() for label, kws in labels.items() for w in [label, *kws]]
    words = SHARED + [w for f in FILLER.values() for w in f] + keywords + ["Label"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         pad_token_id=fast.pad_token_id, bos_token_id=None, eos_token_id=None)
    return LlamaForCausalLM(config).eval(), fast


def keyword_task(name: str, n_train: int = 64, n_eval: int = 32, seed: int = 0,
                 domains: bool = False) -> ContinualTask:
    """Rows of shared filler words and one keyword deciding the label; with ``domains``, one filler word comes from
    the task's own domain."""
    rng = random.Random(seed)
    labels = TASKS[name]

    def row() -> dict[str, str]:
        label = rng.choice(sorted(labels))
        context = [rng.choice(FILLER[name])] + rng.sample(SHARED, 2) if domains else rng.sample(SHARED, 4)
        words = context + [rng.choice(labels[label])]
        rng.shuffle(words)
        return {"text": " ".join(words), "label": label}

    return ContinualTask(name, sorted(labels), [row() for _ in range(n_train)], [row() for _ in range(n_eval)],
                         "{text} Label :")


def tasks(domains: bool = False) -> list[ContinualTask]:
    return [keyword_task(n, seed=i, domains=domains) for i, n in enumerate(TASKS)]


ADAPTER = AdapterSettings(rank=4, alpha=8, targets="all-linear")
FIT = FitSettings(steps=30, batch_size=8, lr=1e-2)


@functools.cache
def learn(method: str, **options) -> tuple[torch.nn.Module, AccuracyMatrix, object]:
    """The tasks learned in sequence by ``method`` (cached: tests only read the result)."""
    model, tok = tiny_model()
    learner = LEARNERS.get(method)(ADAPTER, FIT, **options)
    model, matrix = run_sequence(model, tok, tasks(), learner, log=lambda s: None)
    return model, matrix, learner


# -- the accuracy matrix -------------------------------------------------------------------------------------------
def test_matrix_summaries_by_hand() -> None:
    m = AccuracyMatrix(["a", "b", "c"])
    m.add("after a", [0.9, 0.1, 0.2])
    m.add("after b", [0.7, 0.8, 0.3])
    m.add("after c", [0.5, 0.6, 0.9])
    m.add("forget b", [0.5, 0.3, 0.9])  # unlearning rows never enter the learning summaries
    assert m.average_accuracy() == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    assert m.forgetting() == pytest.approx(((0.9 - 0.5) + (0.8 - 0.6)) / 2)
    assert m.backward_transfer() == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)
    with pytest.raises(ValueError, match="2 accuracies for 3 tasks"):
        m.add("x", [0.1, 0.2])


def test_sequential_forgets_and_joint_does_not() -> None:
    _, seq, _ = learn("sequential")
    _, joint, _ = learn("joint")
    assert seq.rows[0][0] > seq.before[0] + 0.1  # the first task was learned...
    assert seq.forgetting() > 0.2  # ...and forgotten
    assert joint.forgetting() < seq.forgetting() - 0.2
    assert joint.average_accuracy() > seq.average_accuracy()


# -- LAE -----------------------------------------------------------------------------------------------------------
def test_lae_ema_update_is_exact() -> None:
    from lorakit.continual.lae import ema_update

    model, _ = tiny_model()
    lorakit.adapt(model, ADAPTER.lora(), "online")
    lorakit.adapt(model, ADAPTER.lora(), "offline", activate=False)
    for p in lorakit.trainable_parameters(model).values():
        p.data.normal_()
    before = {k: v.clone() for k, v in lorakit.trainable_parameters(model).items()}
    ema_update(model, "offline", "online", 0.9)
    after = lorakit.trainable_parameters(model)
    for key, value in after.items():
        if ".offline." in key:
            online = before[key.replace(".offline.", ".online.")]
            torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * online, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(value, before[key])


def test_lae_ensemble_in_one_call_equals_separate_runs() -> None:
    from lorakit.continual.lae import ensemble_logits

    model, tok = tiny_model()
    lorakit.adapt(model, ADAPTER.lora(), "online")
    lorakit.adapt(model, ADAPTER.lora(), "offline", activate=False)
    for p in lorakit.trainable_parameters(model).values():
        p.data.normal_(std=0.3)
    scorer, _, held = tasks()[0].encoded(tok)
    batch = scorer.collate(held[:6])
    with torch.no_grad():
        together = ensemble_logits(model, scorer, batch, ["online", "offline"])
        probs = []
        for name in ("online", "offline"):
            lorakit.set_active(model, name)
            probs.append(scorer.label_logits(model, batch).softmax(-1))
    torch.testing.assert_close(together, torch.maximum(*probs).log(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(probs[0], probs[1])  # the two experts differ, so the max is a real choice


def test_lae_offline_adapter_accumulates_the_online_one() -> None:
    """m = 0: the offline adapter is the online one; m ~ 1: it stays the copy taken when the second task began."""
    model, tok = tiny_model()
    (s0, tr0, _), (s1, tr1, _) = [t.encoded(tok) for t in tasks()[:2]]
    snapshots = {}
    for momentum in (0.0, 1 - 1e-9):
        model, _ = tiny_model()
        learner = LEARNERS.get("lae")(ADAPTER, FIT, momentum=momentum)
        learner.learn(model, 0, s0, tr0)
        at_task_start = {k: v.clone() for k, v in lorakit.trainable_parameters(model, "online").items()}
        learner.learn(model, 1, s1, tr1)
        assert set(lorakit.trainable_parameters(model)) == set(lorakit.trainable_parameters(model, "online"))
        online = lorakit.trainable_parameters(model, "online")
        offline = {k: v for k, v in model.state_dict().items() if ".offline." in k}
        snapshots[momentum] = (at_task_start, online, offline)
    start, online, offline = snapshots[0.0]
    for key, value in online.items():
        torch.testing.assert_close(offline[key.replace(".online.", ".offline.")], value)
    start, online, offline = snapshots[1 - 1e-9]
    for key, value in start.items():
        torch.testing.assert_close(offline[key.replace(".online.", ".offline.")], value)
        assert not torch.allclose(online[key], value)  # the online adapter moved on
    with pytest.raises(lorakit.LorakitError, match="ensemble"):
        learner.finish(model)


# -- CoDyRA ----------------------------------------------------------------------------------------------------------
def test_codyra_merges_each_task_and_skips_zero_rank_layers() -> None:
    from lorakit.hosts.host import HostLayer

    model, tok = tiny_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    learner = LEARNERS.get("codyra")(ADAPTER, FIT, sparsity=1.2)
    scorer, train, _ = tasks()[0].encoded(tok)
    learner.learn(model, 0, scorer, train)
    assert not any(isinstance(m, HostLayer) for m in model.modules())  # the base architecture, adapters merged
    assert set(model.state_dict()) == set(original)
    kept = learner.ranks[0]
    all_layers = [t.path for t in lorakit.inspect_targets(model, ADAPTER.lora())]
    skipped = [p for p in all_layers if p not in kept]
    assert kept and skipped, kept  # the sparsity kept some layers and dropped others
    for path in all_layers:
        same = torch.equal(model.state_dict()[f"{path}.weight"], original[f"{path}.weight"])
        assert same == (path in skipped), path  # a zero-rank layer is bit-identical; a kept one changed
    assert all(0 < r <= ADAPTER.rank for r in kept.values())


def test_codyra_without_sparsity_keeps_every_rank() -> None:
    model, tok = tiny_model()
    learner = LEARNERS.get("codyra")(ADAPTER, FIT, sparsity=0.0)
    scorer, train, _ = tasks()[0].encoded(tok)
    learner.learn(model, 0, scorer, train)
    assert set(learner.ranks[0].values()) == {ADAPTER.rank}


def test_codyra_sparsity_prunes_more_with_larger_lambda() -> None:
    kept = []
    for lam in (0.0, 1.1, 1.6):
        model, tok = tiny_model()
        learner = LEARNERS.get("codyra")(ADAPTER, FIT, sparsity=lam)
        scorer, train, _ = tasks()[0].encoded(tok)
        learner.learn(model, 0, scorer, train)
        kept.append(sum(learner.ranks[0].values()))
    assert kept[0] > kept[1] > kept[2] >= 0


# -- AlignGuard ------------------------------------------------------------------------------------------------------
def test_kfac_factors_match_autograd_for_one_token() -> None:
    from lorakit.continual.fisher import kfac_factors

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    net.requires_grad_(False)
    x = torch.randn(1, 5)
    factors = kfac_factors(net, ["0"], [lambda: net(x).square().sum()])
    g, s = factors["0"]
    w = net[0].weight.detach().clone().requires_grad_(True)  # the exact per-example weight gradient, by autograd
    loss = torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, w, net[0].bias)), net[2].weight,
                                      net[2].bias).square().sum()
    grad = torch.autograd.grad(loss, w)[0]
    exact_fisher = torch.outer(grad.flatten(), grad.flatten())  # vec(dW) vec(dW)^T, row-major vec
    torch.testing.assert_close(torch.kron(g, s), exact_fisher, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s, x.T @ x)
    assert net[0].weight.grad is None and not net[0].weight.requires_grad  # the model is left as it was


def _directions(d_out: int = 6, d_in: int = 5, k: int = 2):
    from lorakit.continual.fisher import Directions

    u = torch.linalg.qr(torch.randn(d_out, d_out))[0]
    v = torch.linalg.qr(torch.randn(d_in, d_in))[0]
    return Directions(u[:, :k], torch.tensor([2.0, 1.0]), v[:, :k], torch.tensor([3.0, 0.5])), u, v


def test_alignguard_penalty_is_the_fisher_quadratic_form_and_zero_off_the_critical_directions() -> None:
    from lorakit.continual.alignguard import split_update

    d, u, v = _directions()
    b, a = torch.randn(6, 3), torch.randn(3, 5)
    m, critical, rest = split_update(d, b, a)
    penalty = (d.weights() * m.square()).sum()
    fisher = sum(d.weights()[i, j] * torch.outer(torch.outer(d.u[:, i], d.v[:, j]).flatten(),
                                                 torch.outer(d.u[:, i], d.v[:, j]).flatten())
                 for i in range(2) for j in range(2))
    dense = (b @ a).flatten()
    torch.testing.assert_close(penalty, dense @ fisher @ dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(critical + rest, b @ a)
    assert abs(float((critical * rest).sum())) < 1e-4  # the split is orthogonal
    off = torch.outer(u[:, 3], v[:, 4]) + torch.outer(u[:, 0], v[:, 3])  # outside span{u_i v_j^T: i, j < 2}
    m_off, critical_off, _ = split_update(d, off, None)
    assert float(m_off.abs().max()) < 1e-5 and float(critical_off.abs().max()) < 1e-5


def test_alignguard_protects_the_earlier_task() -> None:
    """With the Fisher penalty the first task's loss rises less while the second is learned than without it."""
    from lorakit.continual.loop import cross_entropy

    rises = []
    for weight in (0.0, 1e4):
        model, tok = tiny_model()
        learner = LEARNERS.get("alignguard")(ADAPTER, FIT, fisher_weight=weight, collision_weight=0.0)
        (s0, tr0, held0), (s1, tr1, _) = [t.encoded(tok) for t in tasks()[:2]]
        learner.learn(model, 0, s0, tr0)
        with torch.no_grad():
            before = float(cross_entropy(s0)(model, s0.collate(held0)))
        learner.learn(model, 1, s1, tr1)
        with torch.no_grad():
            rises.append(float(cross_entropy(s0)(model, s0.collate(held0))) - before)
    assert rises[1] < 0.5 * rises[0], rises


# -- O3 --------------------------------------------------------------------------------------------------------------
@functools.cache
def joint_on_domains() -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Every domain task learned jointly and merged: the model unlearning requests act on."""
    model, tok = tiny_model()
    learner = LEARNERS.get("joint")(ADAPTER, FitSettings(steps=80, batch_size=8, lr=1e-2))
    model, _ = run_sequence(model, tok, tasks(domains=True), learner, log=lambda s: None)
    return learner.finish(model), tok


def learned_then_forget(unlearn: str, forget: list[str], **options) -> tuple[torch.nn.Module, list[list[float]],
                                                                            object]:
    """The joint-learned model (all tasks known, merged) after ``unlearn`` handled the ``forget`` requests:
    ``(model, [accuracies before, after each request], unlearner)``."""
    from lorakit.continual.gs_lora import FFN_TARGETS
    from lorakit.continual.loop import accuracy

    joint, tok = joint_on_domains()
    model = copy.deepcopy(joint)
    encoded = [t.encoded(tok) for t in tasks(domains=True)]
    adapter = AdapterSettings(rank=4, alpha=8, targets=FFN_TARGETS) if unlearn == "gs-lora" else ADAPTER
    unlearner = UNLEARNERS.get(unlearn)(adapter, FIT, **options)
    rows = [[accuracy(model, s, held) for s, _, held in encoded]]
    for name in forget:
        index = list(TASKS).index(name)
        retained = [(s, tr) for i, (s, tr, _) in enumerate(encoded) if i != index]
        unlearner.forget(model, encoded[index][0], encoded[index][1], retained)
        rows.append([accuracy(model, s, held, unlearner.predict) for s, _, held in encoded])
    return model, rows, unlearner


def test_o3_unlearns_one_task_and_keeps_the_others() -> None:
    _, (learned, after), o3 = learned_then_forget("o3", ["motion"])
    assert learned[1] > 0.8  # motion was learned (joint training)
    assert after[1] <= 0.65  # ...and is at chance (2 labels) after the request
    for i in (0, 2):
        assert after[i] >= 0.95 * learned[i], (learned, after)


def test_o3_gate_separates_the_forget_task_and_zero_weight_is_the_base() -> None:
    model, _, o3 = learned_then_forget("o3", ["motion"])
    _, tok = joint_on_domains()
    scores = {}
    for task in tasks(domains=True):
        scorer, _, held = task.encoded(tok)
        scores[task.name] = float(o3.weights(model, scorer.collate(held)).mean())
    assert scores["motion"] > 0.5 and scores["colour"] < 0.05 and scores["animal"] < 0.05, scores
    scorer, _, held = tasks(domains=True)[0].encoded(tok)
    batch = scorer.collate(held[:5])
    with torch.no_grad(), lorakit.mix(model, o3.names, torch.zeros(5, 1)):
        gated_off = scorer.label_logits(model, batch)
    with torch.no_grad(), lorakit.disable(model):
        base = scorer.label_logits(model, batch)
    torch.testing.assert_close(gated_off, base)


def test_o3_requests_are_orthogonal() -> None:
    penalties = {}
    for weight in (0.0, 10.0):
        model, _, o3 = learned_then_forget("o3", ["motion", "animal"], orthogonal_weight=weight)
        from lorakit.continual.o3 import Orthogonality

        penalties[weight] = float(Orthogonality(o3.names[1], o3.names[:1], 1.0).penalty(model).detach())
    assert penalties[10.0] < 0.05 * penalties[0.0], penalties


# -- GS-LoRA ---------------------------------------------------------------------------------------------------------
def test_group_prox_zeroes_whole_groups_and_shrinks_the_rest_exactly() -> None:
    from lorakit.continual.gs_lora import group_prox, nonzero_groups

    small = [torch.full((2, 2), 0.1), torch.full((3,), 0.1)]  # norm sqrt(7) * 0.1 ~ 0.26
    large = [torch.full((2, 2), 1.0), torch.zeros(3)]  # norm 2
    groups = {0: small, 1: large}
    group_prox(groups, 0.5)
    assert nonzero_groups(groups) == [1]
    assert all(float(t.abs().sum()) == 0 for t in small)
    torch.testing.assert_close(large[0], torch.full((2, 2), 1.0 * (1 - 0.5 / 2.0)))


def test_gs_lora_forgets_and_sparsity_grows_with_lambda() -> None:
    from lorakit.continual.gs_lora import nonzero_groups

    counts = []
    for lam in (0.0, 30.0, 100.0):
        _, (learned, after), gs = learned_then_forget("gs-lora", ["motion"], group_lambda=lam)
        counts.append(len(nonzero_groups(gs.groups)))
        if lam == 0.0:
            assert after[1] <= 0.65 < learned[1]  # the forgotten task falls to chance...
            assert after[0] >= 0.95 * learned[0] and after[2] >= 0.95 * learned[2]  # ...not the rest
    assert counts[0] >= counts[1] >= counts[2] and counts[0] > counts[2], counts


# -- runner, tasks, command line -------------------------------------------------------------------------------------
def test_runner_refuses_bad_requests() -> None:
    model, tok = tiny_model()
    learner = LEARNERS.get("sequential")(ADAPTER, FIT)
    with pytest.raises(lorakit.LorakitError, match="not among the tasks"):
        run_sequence(model, tok, tasks(), learner, UNLEARNERS.get("o3")(ADAPTER, FIT), ["nope"])
    with pytest.raises(lorakit.LorakitError, match="needs an unlearning method"):
        run_sequence(model, tok, tasks(), learner, None, ["motion"])
    with pytest.raises(lorakit.LorakitError, match="retained data"):
        UNLEARNERS.get("gs-lora")(ADAPTER, FIT).forget(model, *tasks()[0].encoded(tok)[:2], [])


def test_embedded_tasks_hold_out_whole_plays_and_balance_labels() -> None:
    from lorakit.continual.tasks import GENRES, _passages, load_tasks

    tweets, plays, dialogue = load_tasks(["tweets", "shakespeare", "dialogue"], n_train=60, n_eval=30)
    assert plays.labels == ["comedy", "history", "tragedy"] and dialogue.labels == ["ai", "coding", "emotion",
                                                                                     "trivia"]
    unseen = {p for genre in GENRES.values() for p in _passages(genre[-1])}
    assert all(r["text"] in unseen for r in plays.held_out)
    assert not any(r["text"] in unseen for r in plays.train)
    for task in (tweets, plays, dialogue):
        texts = [r["text"] for r in task.train + task.held_out]
        assert len(set(texts)) == len(texts)  # no held-out example is also trained on
        assert len(task.held_out) == 30 and len(task.train) == 60


def test_task_files_are_checked(tmp_path) -> None:
    from lorakit.continual.tasks import load_tasks
    from lorakit.train.errors import DataError

    (tmp_path / "a.jsonl").write_text("".join(f'{{"text": "x{i}", "label": "{i % 2}"}}\n' for i in range(20)))
    (tmp_path / "b.jsonl").write_text('{"text": "x", "kind": "y"}\n')
    assert load_tasks([str(tmp_path / "a.jsonl")], n_eval=5)[0].labels == ["0", "1"]
    with pytest.raises(DataError, match="'text' and 'label'"):
        load_tasks([str(tmp_path / "b.jsonl")])
    with pytest.raises(DataError, match="neither an embedded task"):
        load_tasks(["nosuch"])
    with pytest.raises(DataError, match="distinct names"):
        load_tasks([str(tmp_path / "a.jsonl")] * 2, n_eval=5)


def test_cli_continual_writes_the_matrix(tmp_path, capsys) -> None:
    import json

    from lorakit.cli import main

    model, tok = tiny_model()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    files = []
    for task in tasks()[:2]:
        path = tmp_path / f"{task.name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in task.train + task.held_out))
        files.append(str(path))
    code = main(["continual", "--model", str(tmp_path / "m"), "--tasks", ",".join(files), "--method", "lae",
                 "--steps", "4", "--eval-size", "16", "--targets", "all-linear", "--output", str(tmp_path / "out"),
                 "--unlearn", "o3", "--forget", "colour"])
    assert code == 2 and "LAE predicts with an ensemble" in capsys.readouterr().err
    code = main(["continual", "--model", str(tmp_path / "m"), "--tasks", ",".join(files), "--steps", "4",
                 "--eval-size", "16", "--targets", "all-linear", "--output", str(tmp_path / "out")])
    assert code == 0
    saved = json.loads((tmp_path / "out" / "matrix.json").read_text())
    assert saved["tasks"] == ["colour", "motion"] and len(saved["rows"]) == 2 and "forgetting" in saved
    assert main(["continual", "--method", "codyra", "--method-option", "bogus=1", "--steps", "1"]) == 2
    assert "unknown option(s) ['bogus']" in capsys.readouterr().err


def test_o3_detector_pooling_is_checked_and_mean_pooling_runs() -> None:
    with pytest.raises(lorakit.LorakitError, match="pooling"):
        UNLEARNERS.get("o3")(ADAPTER, FIT, pooling="max")
    model, _, o3 = learned_then_forget("o3", ["motion"], pooling="mean")
    _, tok = joint_on_domains()
    scorer, _, held = tasks(domains=True)[1].encoded(tok)
    assert float(o3.weights(model, scorer.collate(held)).mean()) > 0.5
