"""Parity of every foreign format this project reads, against transformers (PyTorch) on the
same weights: t5x T5 checkpoints (native v3 and v2, orbax layout), t5x_retrieval dual encoders,
Atlas reference checkpoints (tied, untied, `module.`), and the `convert` round trip.

    python -m bench.formats_parity [--out bench/results/formats_parity.json]

The artifacts are written in each format's own layout by tests/t5x_reference.py and
tests/atlas_reference.py (tiny random models, float32). Prints a table (reader logits: max
relative error; retrievers: min cosine and max relative norm error) and writes it as JSON.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench import emit

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _relative(ours, theirs) -> float:
    import numpy as np
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _cosine(ours, theirs) -> tuple[float, float]:
    import numpy as np
    norms = np.linalg.norm(ours, axis=-1), np.linalg.norm(theirs, axis=-1)
    cosine = (ours * theirs).sum(-1) / norms[0] / norms[1]
    return float(cosine.min()), float(np.abs(norms[0] / norms[1] - 1).max())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/formats_parity.json")
    args = parser.parse_args(argv)
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    import torch

    import atlas_jax
    from tests.atlas_reference import contriever_embed, make_contriever, write_atlas_checkpoint
    from tests.hf_reference import make_hf_t5, random_ids
    from tests.t5x_reference import (t5x_params_from_hf, write_t5x_native, write_t5x_orbax,
                                     write_t5x_retrieval)
    from tests.test_formats_t5x_retrieval import _dual_encoder, _reference

    rng = np.random.default_rng(0)
    enc, dec = random_ids(rng, 4, 40, 96), random_ids(rng, 4, 16, 96, pad_tail=False)
    ids = random_ids(rng, 6, 24, 40)
    mask = (ids != 0).astype(np.int32)

    def t5_logits(model):
        with torch.no_grad():
            return model(input_ids=torch.tensor(enc, dtype=torch.long),
                         attention_mask=torch.tensor(enc != 0, dtype=torch.long),
                         decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for version, t5x_version, layout in (("v1.1", 3, "native"), ("v1.0", 3, "native"),
                                             ("v1.1", 2, "native"), ("v1.1", 3, "orbax")):
            model = make_hf_t5(tmp / f"hf_{version}", version=version)
            params = t5x_params_from_hf(model.state_dict(), gated=version == "v1.1",
                                        untied=version == "v1.1")
            folder = tmp / f"t5x_{version}_{t5x_version}_{layout}" / "checkpoint_1"
            (write_t5x_native(folder, params, version=t5x_version) if layout == "native"
             else write_t5x_orbax(folder, params))
            reader = atlas_jax.load_reader(folder)
            rows.append({"format": f"t5x {layout} v{t5x_version}, T5 {version}",
                         "reader_logits_max_rel_err": _relative(reader.logits(enc, dec),
                                                                t5_logits(model))})
        for gated in (False, True):
            encoder, projection = _dual_encoder(gated)
            folder = write_t5x_retrieval(tmp / f"de_{gated}" / "checkpoint_1", encoder,
                                         projection, gated)
            e_ids = random_ids(rng, 6, 40, 96)
            ours = atlas_jax.load_retriever(folder).embed_tokens(e_ids, (e_ids > 0).astype(int))
            cosine, norm = _cosine(ours, _reference(encoder, projection, e_ids))
            rows.append({"format": "t5x_retrieval " + ("sentence-T5 (gated)" if gated
                                                       else "GTR (ReLU)"),
                         "embedding_min_cosine": cosine, "embedding_max_rel_norm_err": norm})
        t5 = make_hf_t5(tmp / "hf_atlas", version="v1.1")
        query, passage = make_contriever(seed=1), make_contriever(seed=2)
        for layout in ("tied", "untied", "module"):
            path = write_atlas_checkpoint(tmp / layout / "model.pth.tar", t5, query,
                                          passage if layout == "untied" else None,
                                          module=layout == "module")
            reader, retriever = atlas_jax.load_atlas(path, head_dim=16)
            row = {"format": f"Atlas model.pth.tar ({layout})",
                   "reader_logits_max_rel_err": _relative(reader.logits(enc, dec), t5_logits(t5))}
            for tower, model in (("query", query), ("passage", passage if layout == "untied"
                                                    else query)):
                cosine, norm = _cosine(retriever.embed_tokens(ids, mask, tower),
                                       contriever_embed(model, ids, mask))
                row[f"{tower}_min_cosine"], row[f"{tower}_max_rel_norm_err"] = cosine, norm
            rows.append(row)
    print(f"{'format':44} {'reader rel err':>15} {'min cosine':>11} {'norm rel err':>13}")
    for row in rows:
        reader = row.get("reader_logits_max_rel_err")
        cosine = row.get("embedding_min_cosine", row.get("query_min_cosine"))
        norm = row.get("embedding_max_rel_norm_err", row.get("query_max_rel_norm_err"))
        print(f"{row['format']:44} {'-' if reader is None else f'{reader:.3g}':>15} "
              f"{'-' if cosine is None else f'{cosine:.7f}':>11} "
              f"{'-' if norm is None else f'{norm:.2e}':>13}")
    result = {"rows": rows}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
