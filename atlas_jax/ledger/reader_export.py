"""Writes a reader as a Hugging Face T5 folder, and the model card of a pre-trained one.

    save_reader(reader, folder)        # config.json + model.safetensors (+ spiece.model)
    atlas-jax reader export --run MODEL_DIR --out atlas_jax/readers/ledger_t5

The folder is what `load_reader` reads (and what `transformers.T5ForConditionalGeneration
.from_pretrained` reads: the names and layouts are Hugging Face's). The export of a
pre-training run adds `model_card.json` (data, objectives, steps, wall time, held-out copy
accuracy per field, parameter shapes, vocabulary size, sha256 of the files) and a
human-readable `README.md`. Every file is written to a temporary folder first and moved into
place whole, and an existing `--out` is replaced only when it holds a model card of ours.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from atlas_jax import fileio
from atlas_jax.formats.hf import t5_hf_config as hf_config  # noqa: F401 (re-exported)

CARD = "model_card.json"
OUTPUT_KIND = "reader"          # the kind in the folder's .atlas-jax.json marker
CARD_FORMAT = "atlas-jax-reader-card/1"


def hf_tensors(reader) -> dict[str, np.ndarray]:
    """The reader's parameters under Hugging Face T5 names (float32, torch layouts)."""
    import flax
    import jax

    from atlas_jax import weights
    from atlas_jax.models import stacking
    params = stacking.unstack_layers(flax.linen.meta.unbox(reader.params))
    flat = {"/".join(k.key for k in path): np.asarray(leaf, np.float32) for path, leaf in
            jax.tree_util.tree_flatten_with_path(params)[0]}
    out = {}
    for ours, (theirs, transform) in weights.t5_hf_mapping(reader.config).items():
        # Both transforms are their own inverses (identity, transpose).
        out[theirs] = np.ascontiguousarray(transform(flat.pop(ours)))
    if reader.config.logits_via_embedding:
        out["lm_head.weight"] = out["shared.weight"]
    out["encoder.embed_tokens.weight"] = out["shared.weight"]
    out["decoder.embed_tokens.weight"] = out["shared.weight"]
    if flat:
        raise ValueError(f"parameters with no Hugging Face name: {sorted(flat)}")
    return out


def save_reader(reader, folder: str | Path, spiece_model: str | Path | None = None) -> Path:
    """Writes `config.json`, `model.safetensors` and (if given) `spiece.model` into
    `folder` (created; files of the same names are overwritten)."""
    from safetensors.numpy import save as save_bytes
    folder = Path(folder)
    fileio.atomic_write_text(folder / "config.json",
                             json.dumps(hf_config(reader.config), indent=1) + "\n")
    tensors = hf_tensors(reader)
    # safetensors refuses shared memory: one copy per name.
    fileio.atomic_write_bytes(folder / "model.safetensors", save_bytes(
        {k: np.array(v) for k, v in tensors.items()}, metadata={"format": "pt"}))
    if spiece_model is not None:
        fileio.atomic_write_bytes(folder / "spiece.model", Path(spiece_model).read_bytes())
    return folder


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parameter_shapes(reader) -> dict[str, list[int]]:
    import flax
    import jax
    return {"/".join(k.key for k in path): list(np.shape(leaf)) for path, leaf in
            jax.tree_util.tree_flatten_with_path(flax.linen.meta.unbox(reader.params))[0]}


# ----------------------------------------------------------------------------- a run's export

def _run_reader(run_dir: Path):
    """(Reader at the run's latest checkpoint, spiece.model path, the run's metrics log)."""
    from atlas_jax import checkpoints, gin_config, weights
    from atlas_jax.ledger import reader_pretrain
    config_gin = run_dir / "config.gin"
    if not config_gin.is_file():
        raise FileNotFoundError(f"{config_gin}: not found (is {run_dir} a reader "
                                "pre-training run?)")
    gin_config.parse([str(config_gin)], [])
    config = reader_pretrain.ReaderPretrainConfig(model_dir=str(run_dir))
    from atlas_jax_tasks import vocab
    spm = run_dir / "corpus" / "spiece.model"
    vocabulary = vocab.reader_vocabulary(str(spm))
    model_config, model = reader_pretrain.make_model(
        vocabulary, getattr(config, "copy_from_evidence", False))
    params = reader_pretrain.init_params(model, config.seed)
    optimizer = reader_pretrain.make_optimizer(config)
    manager = checkpoints.Checkpoints(run_dir / "checkpoints", config.max_to_keep)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no checkpoint to export")
    state, meta = manager.restore(step, {"params": params,
                                         "opt_state": optimizer.init(params)})
    manager.close()
    log = checkpoints.MetricsLog(run_dir, tensorboard=False).read()
    return weights.Reader(model_config, state["params"]), spm, config, meta, log


def model_card(reader, folder: Path, config, meta: dict, log: list[dict]) -> dict:
    """The card of an exported pre-trained reader (see the module docstring)."""
    summary_path = Path(config.model_dir) / "corpus" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    heldout = [r for r in log if any(k.startswith("heldout/") for k in r)]
    losses = [r for r in log if "loss" in r]
    return {
        "format": CARD_FORMAT,
        "name": folder.name,
        "architecture": "T5 v1.1 (gated GELU, untied output layer), Fusion-in-Decoder reader"
                        + (" with a pointer-generator copy head (`atlas_jax.copy_head.*` "
                           "tensors: transformers drops them)"
                           if reader.config.copy_head else "")
                        + ("; the pointer copies from the evidence only, skipping each "
                           "passage row's `question: ... answer: <extra_id_0>` prompt "
                           "(`atlas_jax_copy_skip_through_id`)"
                           if reader.config.copy_skip_through_id is not None else ""),
        "config": hf_config(reader.config),
        "parameters": int(sum(np.prod(s) for s in parameter_shapes(reader).values())),
        "parameter_shapes": parameter_shapes(reader),
        "vocabulary": {"file": "spiece.model", "size_with_sentinels":
                       int(summary.get("spm_pieces", 0)), "split_digits": config.split_digits,
                       "number_pieces": config.number_pieces, "sentinels": 100},
        "data": {"ledgers": summary.get("ledgers"),
                 "heldout_ledger": summary.get("heldout_ledger"),
                 "examples": summary.get("examples"),
                 "redated_copies": summary.get("redated") or [],
                 "generator": "beancount bean-example (write_example_ledger)",
                 "never_used": "QA templates, questions or answers of any split"},
        "objectives": {name: text for name, text in {
            "read": "multi-passage reading: one field of an entry named, two others as cues, "
                    f"the entry among {config.n_passages - 1} distractors"
                    + (" (easy ones first: another day and payee; then hard: the same day, "
                       "nearby days, the same payee)"
                       if config.easy_steps or config.easy_fraction else ""),
            "salient": "salient-span masking of an entry field (REALM), among the same "
                       "distractors",
            "span": "T5 span corruption of an entry (density 0.15, mean span 3)",
            "copy": "cued copy: the entry's tokens after a 4-token cue taken from it",
            "prefix": "prefix LM of an entry"}.items()
            if {"span": config.lm_weight * config.span_fraction,  # the used ones only
                "copy": config.lm_weight * config.copy_fraction,
                "prefix": config.lm_weight * (1 - config.span_fraction - config.copy_fraction)
                }.get(name, 1) > 0},
        "mixture": {"read_fraction": config.read_fraction,
                    "span_fraction": config.span_fraction,
                    "copy_fraction": config.copy_fraction, "lm_weight": config.lm_weight},
        "training": training_summary(config, meta, losses),
        "heldout_copy_accuracy": ({k.split("/", 1)[1]: v for k, v in heldout[-1].items()
                                   if k.startswith("heldout/")} if heldout else {}),
        "heldout_copy_accuracy_alone": ({k.split("/", 1)[1]: v for k, v in
                                         heldout[-1].items() if k.startswith("heldout_alone/")}
                                        if heldout else {}),
        "heldout_copy_accuracy_redated": ({k.split("/", 1)[1]: v for k, v in
                                           heldout[-1].items()
                                           if k.startswith("heldout_redated/")}
                                          if heldout else {}),
        "heldout_redate_years": summary.get("heldout_redate_years", 0),
        "heldout_copy_accuracy_step": heldout[-1]["step"] if heldout else None,
        "files": {name: sha256(folder / name) for name in ("model.safetensors",
                                                             "spiece.model", "config.json")},
    }


def _stage(config, meta: dict, losses: list[dict]) -> dict:
    """One pre-training run's steps, wall time, batch, schedule and curriculum."""
    return {"steps": int(meta.get("step", 0)), "wall_s": round(meta.get("wall_s", 0.0), 1),
            "batch_size": config.batch_size, "n_passages": config.n_passages,
            "lm_batch_size": config.lm_batch_size, "learning_rate": config.learning_rate,
            "schedule": f"warmup {config.warmup_steps}, cosine to "
                        f"{config.end_learning_rate_fraction} x",
            "curriculum": {"alone_steps": config.alone_steps, "ramp_steps": config.ramp_steps,
                           "full_fraction": config.full_fraction,
                           "easy_steps": config.easy_steps,
                           "easy_fraction": config.easy_fraction},
            "copy_fraction": config.copy_fraction,
            "redate_copies": getattr(config, "redate_copies", 0),
            "copy_from_evidence": getattr(config, "copy_from_evidence", False),
            "seed": config.seed, "final_loss": losses[-1]["loss"] if losses else None,
            "hardware": "2 CPU cores"}


def training_summary(config, meta: dict, losses: list[dict]) -> dict:
    """The card's `training`: this run, after the stages of the reader it started from
    (`init_from`: its card's stages), with the steps and wall time of all of them."""
    this = _stage(config, meta, losses)
    stages = []
    if getattr(config, "init_from", None):
        from atlas_jax import weights
        folder = weights.resolve_path(config.init_from)
        try:
            before = json.loads((folder / CARD).read_text(encoding="utf-8"))["training"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{folder / CARD}: the card of init_from={config.init_from!r} "
                             f"is unreadable ({type(e).__name__}: {e})") from None
        stages = [dict(s) for s in before.get("stages", [])] or [
            {k: v for k, v in before.items() if k != "stages"}]
    stages.append(dict(this))
    return {**this, "steps": sum(s["steps"] for s in stages),
            "wall_s": round(sum(s["wall_s"] for s in stages), 1), "stages": stages}


def card_markdown(card: dict) -> str:
    alone = card.get("heldout_copy_accuracy_alone", {})
    redated = card.get("heldout_copy_accuracy_redated") or {}
    rows = "\n".join(f"| {k} | {v:.3f} | {alone.get(k, float('nan')):.3f} |"
                     + (f" {redated.get(k, float('nan')):.3f} |" if redated else "")
                     for k, v in card["heldout_copy_accuracy"].items())
    ledgers = ", ".join(f"seed {x['seed']} {x['start']}..{x['end']}"
                        for x in card["data"]["ledgers"] or [])
    t = card["training"]
    return (f"# {card['name']}: the atlas-jax ledger reader\n\n"
            f"{card['architecture']}; {card['parameters']:,} parameters "
            f"({card['config']['num_layers']}+{card['config']['num_decoder_layers']} layers, "
            f"{card['config']['d_model']} wide); SentencePiece vocabulary of "
            f"{card['vocabulary']['size_with_sentinels']} ids (100 of them sentinels)."
            f"\n\nPre-trained by `make reader` for {t['steps']} steps "
            f"({t['wall_s'] / 60:.0f} min on {t['hardware']}"
            + ("" if len(t.get("stages", [])) < 2 else "; " + ", ".join(
                f"stage {i}: {s['steps']} steps, {s['wall_s'] / 60:.0f} min"
                for i, s in enumerate(t["stages"], 1)))
            + f"), unsupervised only, on "
            f"Beancount ledgers generated with {ledgers}. Never trained on a QA template, "
            f"question or answer."
            + "".join(f" Stage {i} also reads each ledger {s['redate_copies']} more times "
                      "with its dates moved by a multiple of 4 years (1904-2096, never a year "
                      "ending in 19-25, the years evaluated anywhere)."
                      for i, s in enumerate(t.get("stages", [t]), 1) if s.get("redate_copies"))
            + "\n\nObjectives: "
            + "; ".join(f"**{k}**: {v}" for k, v in card["objectives"].items())
            + f".\n\nHeld-out copy accuracy (exact match, ledger seed "
            f"{card['data']['heldout_ledger']['seed']}, step "
            f"{card['heldout_copy_accuracy_step']}"
            + (f" of stage {len(t['stages'])}" if len(t.get("stages", [])) > 1 else "")
            + "; `read/` probes name a field, `salient/` "
            f"mask it; the entry among {t['n_passages'] - 1} distractors, or alone):"
            + ("\n\n| field | among distractors | alone |"
               + (f" among distractors, re-dated {card['heldout_redate_years']:+d} years |"
                  if redated else "")
               + "\n| --- | --- | --- |" + (" --- |" if redated else "") + f"\n{rows}\n\n")
            + "`:novel`: the examples whose answer no training example has (an amount the "
            "reader cannot have memorised, only copied).\n\n"
            "Files and sha256: see `model_card.json`.\n")


def _is_legacy_export(folder: Path) -> bool:
    """A reader folder exported before output markers existed: its card has our fields."""
    try:
        card = json.loads((folder / CARD).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(card, dict) and {"training", "heldout_copy_accuracy"} <= set(card)


def export_run(run_dir: str | Path, out: str | Path) -> dict:
    """Exports a pre-training run's latest checkpoint with its card into `out`."""
    run_dir, out = Path(run_dir), Path(out)
    fileio.check_output(out, OUTPUT_KIND, legacy=_is_legacy_export)
    reader, spm, config, meta, log = _run_reader(run_dir)
    fileio.remove_staging_leftovers(out.parent, out.name)
    tmp = fileio.staging_folder(out)
    try:
        save_reader(reader, tmp, spm)
        card = model_card(reader, tmp, config, meta, log)
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
        print(f"atlas-jax reader export: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), "steps": card["training"]["steps"],
                      "heldout_copy_accuracy": card["heldout_copy_accuracy"]}))
    return 0
