"""`atlas-jax ask`: answer a question about a ledger with a trained demo run.

    atlas-jax ask --run DIR "How much did I pay Chichipotle on 2023-03-14?" [--ledger FILE]

Loads the demo's jointly trained model (DIR/runs/finetune_joint, latest checkpoint) and its
refreshed index (DIR/index_refreshed), parses filters from the question
(`atlas_jax_tasks.ledger_query`: dates, amounts, accounts, payees), retrieves with BM25 +
dense (the fusion weight the demo chose on dev) among the passages that satisfy them, and
generates the answer with the FiD reader. Prints the answer, the reader's likelihood of it,
and the evidence passages (id, date, text, score).

`--ledger FILE` first indexes that Beancount file's entries that the index does not hold yet
(embedded with the run's passage tower; nothing is retrained): the hot swap a user needs
when the ledger has grown.

A question is flagged low-confidence, rather than answered as if certain, when no indexed
entry satisfies the parsed filters, when the answer is quoted by none of the evidence entries
(an amount must equal one of an entry's amounts, a name must appear in its text; sums over
several entries are flagged too, since no entry states them), or when the reader's per-token
likelihood of its own answer (geometric mean) is below `--min_confidence`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

STAGE = "finetune_joint"
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def grounding(answer_text: str, evidence: list[dict]) -> list[str]:
    """Ids of the evidence entries that state `answer_text`: every number in it equals one of
    the entry's numbers (dates aside, signs ignored), or, for an answer without numbers, the
    entry's text contains it (case-insensitive)."""
    def numbers(text):
        return {float(n.replace(",", "")) for n in NUMBER.findall(DATE.sub(" ", text))}
    wanted, name = numbers(answer_text), answer_text.strip().lower()
    if not name:
        return []
    return [e["id"] for e in evidence
            if (wanted <= numbers(e["text"]) if wanted else name in e["text"].lower())]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", help="the question, in plain English")
    parser.add_argument("--run", dest="run_dir", required=True,
                        help="the folder `atlas-jax demo --out` wrote")
    parser.add_argument("--ledger", default=None,
                        help="a Beancount file: index its new entries first (hot swap)")
    parser.add_argument("--k", type=int, default=None,
                        help="evidence passages (default: the run's n_context)")
    parser.add_argument("--min_confidence", type=float, default=0.5,
                        help="flag answers whose per-token likelihood is below this")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


class AskError(ValueError):
    """A run folder or ledger that cannot be used; the message names the file."""


def _read_json(path: Path, required: tuple[str, ...]) -> dict:
    """A JSON object file of the run folder with `required` keys; AskError naming it."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, OSError) as e:  # malformed JSON, not UTF-8, unreadable
        raise AskError(f"{path}: not readable JSON ({' '.join(str(e).split())})") from None
    missing = [key for key in required if key not in value] if isinstance(value, dict) else [
        "a JSON object"]
    if missing:
        raise AskError(f"{path}: lacks {missing}; was the folder written by `atlas-jax demo`?")
    return value


def load_model(run_dir: Path) -> tuple[Any, dict, Any, float]:
    """(trainer Run, params, index, dense fusion weight) of a finished demo folder."""
    import gin

    import atlas_jax_tasks
    from atlas_jax import checkpoints, demo, trainer
    from atlas_jax.index import passage_index
    args_path = run_dir / "demo_args.json"
    if not args_path.is_file():
        raise AskError(f"{args_path}: not found; --run must be a folder written by "
                       "`atlas-jax demo --out DIR`")
    args = _read_json(args_path, ("quick", "gin_files", "bindings", "search_paths", "extra"))
    demo.parse_gin(run_dir, args["quick"], args["gin_files"], args["bindings"],
                   args["search_paths"], args["extra"])
    atlas_jax_tasks.register_configured_tasks()
    with gin.config_scope(STAGE):
        config = trainer.TrainConfig(model_dir=str(run_dir / "runs" / STAGE))
        run_ = trainer.build_run(config)
    ckpt = checkpoints.Checkpoints(config.run_dir / "checkpoints", config.max_to_keep)
    step = ckpt.latest_step()
    if step is None:
        raise AskError(f"{config.run_dir / 'checkpoints'}: no checkpoint (the demo did not "
                       "finish its fine-tuning stage)")
    state, _ = ckpt.restore(step, {"params": run_.params,
                                   "opt_state": trainer.init_opt_state(run_, run_.params)})
    ckpt.close()
    params = state["params"]
    index_dir = run_dir / "index_refreshed"
    if not index_dir.is_dir():
        raise AskError(f"{index_dir}: not found (the demo writes it after evaluation)")
    index = passage_index.PassageIndex.load(index_dir, mesh=run_.mesh)
    demo.use_index(run_, index)
    weight = 1.0
    report = run_dir / "report.json"
    if report.is_file():
        try:
            weight = float(_read_json(report, ("config",))["config"]["dense_weight"])
        except (KeyError, TypeError) as e:
            raise AskError(f"{report}: no config.dense_weight ({e!r})") from None
    return run_, params, index, weight


def add_ledger(run_, params, index, ledger_file: str) -> int:
    """Indexes the entries of `ledger_file` that `index` lacks; returns how many."""
    from atlas_jax import demo
    from atlas_jax_tasks import ledger
    entries = ledger.load_ledger(ledger_file)  # LedgerError names file:line
    records = [record for record, _ in ledger.build_passages(entries)]
    known = set(index.store.ids)
    new = [r for r in records if r["id"] not in known]
    if new:
        index.add_passages(new, run_.retriever, params=run_.passage_params(params))
        if index.tokens is None or len(index.tokens.lengths) != len(index.store):
            from atlas_jax.index import passage_index
            index.tokens = passage_index.tokenize_store(index.store, run_.retriever)
        demo.use_index(run_, index)
    return len(new)


def answer(run_, params, index, question: str, dense_weight: float, k: int | None = None,
           min_confidence: float = 0.5) -> dict:
    """Answer, likelihood, flags and evidence for one question."""
    import jax
    import jax.numpy as jnp

    from atlas_jax import demo, trainer
    from atlas_jax.index import hybrid
    from atlas_jax.train_data import Examples
    from atlas_jax_tasks import ledger_query
    from atlas_jax_tasks.qa import strip_sentinels
    vocabulary = demo._ledger_vocabulary(index.store)
    parsed = ledger_query.parse_query(question, vocabulary)
    k = k or run_.config.n_context
    embed = trainer.make_embed_fn(run_, "query")
    queries = run_.batcher.embed_query_texts(
        [question], lambda i, m: embed(params[run_.retriever_key], i, m))
    config = hybrid.HybridConfig(dense_weight=dense_weight, bm25_weight=1.0)
    where = list(parsed.filters) or None
    result = index.search(queries, k, where=where, query_texts=[question], hybrid=True,
                          hybrid_config=config)
    found = np.asarray(result.ids)[0]
    unmatched = where is not None and not (found >= 0).any()
    if unmatched:  # nothing satisfies the filters: answer from the best unfiltered entries
        result = index.search(queries, k, query_texts=[question], hybrid=True,
                              hybrid_config=config)
        found = np.asarray(result.ids)[0]
    prompt = f"question: {question.strip()} answer: <extra_id_0>"
    prompt_ids = np.asarray(run_.vocabulary.encode(prompt), np.int32)
    examples = Examples([prompt_ids], np.zeros((1, 1), np.int32), [question], ["ask"], [[]],
                        [[]], [[]], [None])
    n_context = run_.config.n_context
    rows = np.full((1, n_context), -1)
    rows[0, :min(n_context, len(found))] = found[:n_context]
    reader_ids = run_.batcher.reader_inputs(examples.prompts, rows)
    batch_size = run_.mesh.shape["data"]
    padded = np.repeat(reader_ids, batch_size, axis=0)
    target_length = int(run_.config.feature_lengths["targets"])
    tokens = trainer.make_generate_fn(run_, target_length)(params["reader"], padded)[0]
    tokens = list(tokens)
    generated = tokens[:tokens.index(1) + 1] if 1 in tokens else tokens
    text = strip_sentinels(run_.vocabulary.decode([t for t in generated if t != 1]))
    # The reader's likelihood of its own answer (teacher-forced, EOS included).
    targets = np.zeros((1, target_length), np.int32)
    targets[0, :len(generated)] = generated
    decoder_inputs = np.concatenate([np.zeros((1, 1), np.int32), targets[:, :-1]], axis=1)
    logits = run_.models.reader.apply({"params": params["reader"]}, jnp.asarray(reader_ids),
                                      jnp.asarray(decoder_inputs), deterministic=True)
    logp = jax.nn.log_softmax(np.asarray(logits, np.float32), axis=-1)
    token_logp = np.take_along_axis(np.asarray(logp), targets[..., None], axis=-1)[0, :, 0]
    mean_logp = float(token_logp[:len(generated)].mean()) if generated else float("-inf")
    confidence = float(np.exp(mean_logp))
    scores = np.asarray(result.scores)[0]
    evidence = [{"id": index.store.ids[i], "date": index.store.metadata[i].get("date"),
                 "score": float(s), "text": index.store.texts[i]}
                for i, s in zip(found, scores) if i >= 0]
    grounded_in = grounding(text, evidence)
    reasons = []
    if unmatched:
        reasons.append(f"no ledger entry matches the filters {list(parsed.filters)}")
    if not grounded_in:
        reasons.append("no evidence entry states this answer")
    if confidence < min_confidence:
        reasons.append(f"reader likelihood {confidence:.2f} < {min_confidence}")
    return {"question": question, "answer": text, "confidence": confidence,
            "low_confidence": bool(reasons), "why_low": reasons, "grounded_in": grounded_in,
            "filters": list(parsed.filters), "evidence": evidence}


def run(args: argparse.Namespace) -> int:
    try:
        run_dir = Path(args.run_dir)
        run_, params, index, weight = load_model(run_dir)
        added = add_ledger(run_, params, index, args.ledger) if args.ledger else 0
        out = answer(run_, params, index, args.question, weight, args.k, args.min_confidence)
    except (ValueError, FileNotFoundError) as e:
        print(f"atlas-jax ask: {e}", file=sys.stderr)
        return 2
    out["indexed_new_entries"] = added
    if args.json:
        print(json.dumps(out))
        return 0
    flag = "  [LOW CONFIDENCE: " + "; ".join(out["why_low"]) + "]" if out["low_confidence"] else ""
    print(f"Q: {out['question']}\nA: {out['answer']}  (reader likelihood "
          f"{out['confidence']:.2f}){flag}")
    if added:
        print(f"(indexed {added} new ledger entries from {args.ledger})")
    print(f"filters: {', '.join(out['filters']) or '(none)'}\nevidence:")
    for hit in out["evidence"]:
        text = " | ".join(line.strip() for line in hit["text"].splitlines())
        mark = "  <- states the answer" if hit["id"] in out["grounded_in"] else ""
        print(f"  {hit['score']:.4f}  {hit['id']}  {hit['date']}  {text}{mark}")
    return 0
