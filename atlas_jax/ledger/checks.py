"""Answers checked against the question and the evidence (`LedgerQA.answer` calls `check_answer`).

An answer is presented as confident only if all hold:
  * some ledger entry satisfies the filters parsed from the question;
  * its form is the one the question asks for (`ledger_query.answer_fits`: an amount for
    "how much" and balances, a name for "who", an account for "which account", a date for
    "when");
  * an evidence entry states it (`grounding`): for an amount every number of it is one of the
    entry's numbers (dates aside, signs ignored; a sum over several entries is in none); a
    payee is the entry's payee; an account one of its accounts; a date its date; an answer
    to a question of unknown type appears in the entry's text;
  * the reader's per-token likelihood of it is at least `min_confidence`.
Otherwise it is "not sure": `low_confidence` with the reasons in `why_low`; the evidence is
still shown.
"""
from __future__ import annotations

import re
from typing import Sequence

DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def _numbers(text: str) -> set[float]:
    return {float(n.replace(",", "")) for n in NUMBER.findall(DATE.sub(" ", text))}


def _states(entry: dict, answer: str, answer_type: str | None) -> bool:
    metadata = entry.get("metadata") or {}
    name = answer.strip().casefold()
    if answer_type in ("amount", "balance"):
        wanted = _numbers(answer)
        return bool(wanted) and wanted <= _numbers(entry["text"])
    if answer_type == "payee" and "payee" in metadata:
        return name in {str(metadata.get("payee") or "").casefold(),
                        str(metadata.get("narration") or "").casefold()} - {""}
    if answer_type == "account" and "accounts" in metadata:
        return name in {str(a).casefold() for a in metadata.get("accounts") or ()}
    if answer_type == "date" and "date" in metadata:
        return name == str(metadata["date"])
    wanted = _numbers(answer)
    return wanted <= _numbers(entry["text"]) if wanted else name in entry["text"].casefold()


def grounding(answer: str, evidence: Sequence[dict], answer_type: str | None = None
              ) -> list[str]:
    """Ids of the evidence entries that state `answer` as an answer of `answer_type`
    (module docstring); none for an empty answer."""
    if not answer.strip():
        return []
    return [e["id"] for e in evidence if _states(e, answer, answer_type)]


def choose_beam(answers: Sequence[str], answer_type: str | None, evidence: Sequence[dict],
                preferred: Sequence[dict] = ()) -> int:
    """Grounded beam selection: the index of the most likely answer (`answers` best first)
    whose form is the one the question asks for (`ledger_query.answer_fits`) and that a
    `preferred` entry states (`grounding`; the entries that satisfy the question's filters);
    else that any `evidence` entry states; else the most likely of the asked form; else 0.
    Pass no evidence for an answer no single entry states (a total): form only."""
    from atlas_jax_tasks import ledger_query
    fits = [i for i, a in enumerate(answers) if a.strip() and
            ledger_query.answer_fits(answer_type, a)]
    for entries in (preferred, evidence):
        grounded = [i for i in fits if grounding(answers[i], entries, answer_type)]
        if grounded:
            return grounded[0]
    return (fits or [0])[0]


def check_answer(answer: str, answer_type: str | None, evidence: Sequence[dict],
                 confidence: float, min_confidence: float,
                 unmatched_filters: Sequence[str] | None = None) -> dict:
    """`low_confidence`, `why_low` (reasons), `grounded_in` (evidence ids), `answer_type`
    (what the question asks for) and `answer_form` (what the answer looks like)."""
    from atlas_jax_tasks import ledger_query
    grounded_in = grounding(answer, evidence, answer_type)
    form = ledger_query.answer_type_of(answer)
    reasons = []
    if unmatched_filters:
        reasons.append(f"no ledger entry matches the filters {list(unmatched_filters)}")
    if not ledger_query.answer_fits(answer_type, answer):
        reasons.append(f"the question asks for a {answer_type}, the answer is "
                       + (f"a {'name' if form == 'text' else form}" if form else "empty"))
    if not grounded_in:
        reasons.append("no evidence entry states this answer")
    if confidence < min_confidence:
        reasons.append(f"reader likelihood {confidence:.2f} < {min_confidence}")
    return {"low_confidence": bool(reasons), "why_low": reasons, "grounded_in": grounded_in,
            "answer_type": answer_type, "answer_form": form}
