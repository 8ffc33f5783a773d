"""Answer and retrieval metrics (SQuAD normalisation, as Atlas and its evaluation scripts).

Answer metrics: `exact_match`, `f1` (max over gold answers). Retrieval metrics:
`recall_at_k` (a gold passage id among the top k) and `answer_recall_at_k` (a normalised gold
answer string inside one of the top-k passages: Atlas's / DPR's "has_answer").
"""
from __future__ import annotations

import collections
import re
import string
from typing import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation and articles, collapse whitespace (SQuAD v1.1)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(answer) for answer in answers))


def f1(prediction: str, answers: Sequence[str]) -> float:
    """Token-level F1 against the best gold answer."""
    def pair_f1(predicted_tokens, gold_tokens):
        common = collections.Counter(predicted_tokens) & collections.Counter(gold_tokens)
        overlap = sum(common.values())
        if overlap == 0:
            return 0.0
        precision, recall = overlap / len(predicted_tokens), overlap / len(gold_tokens)
        return 2 * precision * recall / (precision + recall)
    predicted = normalize_answer(prediction).split()
    return max((pair_f1(predicted, normalize_answer(a).split()) for a in answers), default=0.0)


def recall_at_k(retrieved_ids: np.ndarray | Sequence[Sequence], gold_ids: Sequence[Sequence],
                k: int) -> float:
    """Fraction of queries with at least one gold passage id in their top k.

    Args:
      retrieved_ids: (queries, >=k) passage ids, best first (-1 / None padding ignored).
      gold_ids: per query, the gold passage ids (queries without gold count as misses).
    """
    if len(retrieved_ids) != len(gold_ids):
        raise ValueError(f"{len(retrieved_ids)} retrieval rows for {len(gold_ids)} gold lists")
    hits = [bool(set(list(row)[:k]) & set(gold)) for row, gold in zip(retrieved_ids, gold_ids)]
    return float(np.mean(hits)) if hits else 0.0


def has_answer(passage_text: str, answers: Sequence[str]) -> bool:
    """Whether a normalised answer occurs in the normalised passage as whole tokens."""
    passage = f" {normalize_answer(passage_text)} "
    return any(f" {normalize_answer(answer)} " in passage
               for answer in answers if normalize_answer(answer))


def answer_recall_at_k(retrieved_texts: Sequence[Sequence[str]],
                       answers: Sequence[Sequence[str]], k: int) -> float:
    """Fraction of queries whose top-k passages contain a gold answer (`has_answer`)."""
    if len(retrieved_texts) != len(answers):
        raise ValueError(f"{len(retrieved_texts)} retrieval rows for {len(answers)} answer lists")
    hits = [any(has_answer(text, gold) for text in list(texts)[:k])
            for texts, gold in zip(retrieved_texts, answers)]
    return float(np.mean(hits)) if hits else 0.0


def neighbour_recall(approximate_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """ANN recall@k: mean fraction of the exact top-k ids found in the approximate top k."""
    approximate_ids, exact_ids = np.asarray(approximate_ids), np.asarray(exact_ids)
    found = [len(set(a[:k].tolist()) & set(e[:k].tolist()) - {-1}) / k
             for a, e in zip(approximate_ids, exact_ids)]
    return float(np.mean(found)) if found else 0.0
