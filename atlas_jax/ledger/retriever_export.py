"""Writes a pre-trained retriever run as a sentence-transformers folder with its model card.

    atlas-jax retriever export --run MODEL_DIR --out atlas_jax/retrievers/ledger_minilm

The folder is what `load_retriever` reads, and what `sentence_transformers.SentenceTransformer`
and `transformers.BertModel.from_pretrained` read (config.json, model.safetensors in float16,
tokenizer.json, modules.json, 1_Pooling/, sentence_bert_config.json). `model_card.json` holds
the data, objective, steps, wall time, held-out recall per field (MiniLM as shipped and the
result), the parameter count and the sha256 of the files; `README.md` is the same card for
people. Files are written to a staging folder and moved into place whole; an existing `--out`
is replaced only when it holds an export of ours.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from atlas_jax import fileio
from atlas_jax.ledger.reader_export import sha256

CARD = "model_card.json"
OUTPUT_KIND = "retriever"
CARD_FORMAT = "atlas-jax-retriever-card/1"
HASHED_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def _run_retriever(run_dir: Path):
    """(Retriever at the run's latest checkpoint, config, checkpoint meta, metrics log)."""
    from atlas_jax import checkpoints, gin_config, weights
    from atlas_jax.ledger import retriever_pretrain
    config_gin = run_dir / "config.gin"
    if not config_gin.is_file():
        raise FileNotFoundError(f"{config_gin}: not found (is {run_dir} a retriever "
                                "pre-training run?)")
    gin_config.parse([str(config_gin)], [])
    config = retriever_pretrain.RetrieverPretrainConfig(model_dir=str(run_dir))
    base = weights.load_retriever(config.base)
    optimizer = retriever_pretrain.make_optimizer(config, base.params)
    manager = checkpoints.Checkpoints(run_dir / "checkpoints", config.max_to_keep)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no checkpoint to export")
    state, meta = manager.restore(step, {"params": base.params,
                                         "opt_state": optimizer.init(base.params)})
    manager.close()
    log = checkpoints.MetricsLog(run_dir, tensorboard=False).read()
    return (weights.Retriever(base.config, state["params"], base.tokenizer), config, meta, log)


def _heldout(log: list[dict], step: int | None = None) -> tuple[int | None, dict]:
    rows = [r for r in log if any(k.startswith("heldout/") for k in r)]
    if step is not None:
        rows = [r for r in rows if r["step"] == step]
    if not rows:
        return None, {}
    return rows[-1]["step"], {k.split("/", 1)[1]: round(v, 4) for k, v in rows[-1].items()
                              if k.startswith("heldout/")}


def model_card(retriever, folder: Path, config, meta: dict, log: list[dict]) -> dict:
    summary_path = Path(config.model_dir) / "corpus" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    losses = [r for r in log if "loss" in r]
    step, recall = _heldout(log)
    _, base_recall = _heldout(log, 0)
    c = retriever.config
    return {
        "format": CARD_FORMAT,
        "name": folder.name,
        "architecture": f"BERT dual encoder, one tower for queries and passages, {c.pooling} "
                        f"pooling{', L2-normalised' if c.normalize else ''}",
        "base": config.base,
        "config": {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
                   "num_layers": c.num_layers, "num_heads": c.num_heads,
                   "mlp_dim": c.mlp_dim, "max_length": c.max_length},
        "parameters": int(sum(np.size(x) for x in _leaves(retriever.params))),
        "dtype_on_disk": "float16",
        "data": {"ledgers": summary.get("ledgers"),
                 "heldout_ledger": summary.get("heldout_ledger"),
                 "generator": "beancount bean-example (write_example_ledger)",
                 "never_used": "QA templates, questions or answers of any split"},
        "objective": ("InfoNCE (temperature "
                      f"{config.temperature}): a probe of an entry (one field named half the "
                      "time, the date and one other field as cues) -> the entry, against the "
                      f"batch's passages and {config.hard_negatives} hard negative(s) per "
                      "probe (same day, nearby days, same payee)"),
        "training": {"steps": int(meta.get("step", 0)), "wall_s": round(meta.get("wall_s",
                                                                               0.0), 1),
                     "batch_size": config.batch_size, "learning_rate": config.learning_rate,
                     "schedule": f"warmup {config.warmup_steps}, cosine to "
                                 f"{config.end_learning_rate_fraction} x",
                     "frozen": ["token embeddings"] if config.freeze_token_embeddings else [],
                     "seed": config.seed,
                     "final_loss": losses[-1]["loss"] if losses else None,
                     "hardware": "2 CPU cores"},
        "heldout_recall": recall,
        "heldout_recall_base": base_recall,
        "heldout_recall_step": step,
        "files": {name: sha256(folder / name) for name in HASHED_FILES},
    }


def _leaves(params):
    import jax
    return jax.tree.leaves(params)


def card_markdown(card: dict) -> str:
    fields = sorted({k.split("@")[0] for k in card["heldout_recall"]})
    rows = "\n".join(
        f"| {f} | {card['heldout_recall_base'].get(f + '@1', float('nan')):.3f} | "
        f"{card['heldout_recall_base'].get(f + '@5', float('nan')):.3f} | "
        f"{card['heldout_recall'][f + '@1']:.3f} | {card['heldout_recall'][f + '@5']:.3f} |"
        for f in fields)
    ledgers = ", ".join(f"seed {x['seed']} {x['start']}..{x['end']}"
                        for x in card["data"]["ledgers"] or [])
    t, c = card["training"], card["config"]
    return (f"# {card['name']}: the atlas-jax ledger retriever\n\n"
            f"{card['architecture']}; {card['parameters']:,} parameters ({c['num_layers']} "
            f"layers, {c['hidden_size']} wide), from `{card['base']}` (all-MiniLM-L6-v2), "
            f"stored in float16.\n\nPre-trained by `make retriever` (`atlas-jax retriever "
            f"pretrain --gin_file=runs/retriever_pretrain.gin`) for {t['steps']} steps of "
            f"{t['batch_size']} probes ({t['wall_s'] / 60:.0f} min on {t['hardware']}; "
            f"frozen: {', '.join(t['frozen']) or 'nothing'}), unsupervised only, on "
            f"Beancount ledgers generated with {ledgers}. Never trained on a QA template, "
            f"question or answer.\n\nObjective: {card['objective']}.\n\n"
            f"Held-out recall (ledger seed {card['data']['heldout_ledger']['seed']}, "
            f"{card['data']['heldout_ledger'].get('passages', '?')} entries, probes of each "
            f"field against all of them; step {card['heldout_recall_step']}):\n\n"
            f"| probe field | MiniLM R@1 | MiniLM R@5 | this R@1 | this R@5 |\n"
            f"| --- | --- | --- | --- | --- |\n{rows}\n\n"
            f"Files and sha256: see `model_card.json`.\n")


def _is_legacy_export(folder: Path) -> bool:
    return False


def export_run(run_dir: str | Path, out: str | Path) -> dict:
    """Exports a pre-training run's latest checkpoint with its card into `out`."""
    from atlas_jax.convert import save_retriever
    run_dir, out = Path(run_dir), Path(out)
    fileio.check_output(out, OUTPUT_KIND, legacy=_is_legacy_export)
    retriever, config, meta, log = _run_retriever(run_dir)
    fileio.remove_staging_leftovers(out.parent, out.name)
    tmp = fileio.staging_folder(out)
    try:
        save_retriever(retriever, tmp, dtype=np.float16)
        card = model_card(retriever, tmp, config, meta, log)
        card["name"] = out.name
        fileio.atomic_write_text(tmp / CARD, json.dumps(card, indent=1) + "\n")
        fileio.atomic_write_text(tmp / "README.md", card_markdown(card))
        fileio.write_marker(tmp, OUTPUT_KIND)
        fileio.replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card


def main(args: Any) -> int:
    try:
        card = export_run(args.run_dir, args.out)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"atlas-jax retriever export: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), "steps": card["training"]["steps"],
                      "heldout_recall": card["heldout_recall"]}))
    return 0
