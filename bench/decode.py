"""FiD greedy decoding: KV cache (cross-attention keys/values projected once) vs recomputing
the whole decoder over the prefix at every step (no cache), same model, same run.

    python -m bench.decode [--passages 10 --length 128 --max_length 32 --out ...]

Prints a table and writes JSON; both variants must produce identical tokens.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--passages", type=int, default=10)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/decode.json")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax.linen import meta

    from atlas_jax.models import decoding, fid, t5

    config = t5.T5Config(vocab_size=1024, emb_dim=256, num_heads=4, head_dim=64, mlp_dim=1024,
                         num_encoder_layers=4, num_decoder_layers=4,
                         mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                         scale_decoder_outputs=False, dropout_rate=0.0, eos_id=-1)  # no early stop
    model = fid.FusionInDecoder(config)
    rng = np.random.default_rng(0)
    passages = rng.integers(2, 1024, (args.batch, args.passages, args.length)).astype(np.int32)
    params = meta.unbox(model.init(jax.random.key(0), passages[:1, :1], passages[:1, 0, :4])
                        ["params"])

    @jax.jit
    def encode(params, passages):
        return model.apply({"params": params}, passages, method=model.encode_passages)

    @jax.jit
    def cached(params, encoded, mask):
        return decoding.generate(model, params, encoded, mask, args.max_length)

    @jax.jit
    def uncached(params, encoded, mask):
        def step(i, tokens):
            logits = model.apply({"params": params}, encoded, mask, t5.shift_right(tokens),
                                 method=model.decode)
            return tokens.at[:, i].set(jnp.argmax(logits[:, i], -1).astype(jnp.int32))
        return jax.lax.fori_loop(0, args.max_length, step,
                                 jnp.zeros((args.batch, args.max_length), jnp.int32))

    encoded, mask = encode(params, passages)
    results = {}
    outputs = {}
    for name, fn in (("kv_cache", cached), ("no_cache", uncached)):
        outputs[name] = np.asarray(fn(params, encoded, mask))  # compile
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, encoded, mask))
            times.append(time.perf_counter() - t0)
        best = min(times)
        results[name] = {"seconds": best,
                         "tokens_per_second": args.batch * args.max_length / best}
    assert (outputs["kv_cache"] == outputs["no_cache"]).all(), "variants disagree"
    speedup = results["no_cache"]["seconds"] / results["kv_cache"]["seconds"]
    summary = {"device": jax.devices()[0].device_kind, "batch": args.batch,
               "passages": args.passages, "length": args.length,
               "max_length": args.max_length, "results": results,
               "kv_cache_speedup": speedup, "tokens_identical": True}
    print(f"{'variant':<10} {'seconds':>9} {'tokens/s':>10}")
    for name, r in results.items():
        print(f"{name:<10} {r['seconds']:>9.3f} {r['tokens_per_second']:>10.1f}")
    print(f"KV-cache speed-up: {speedup:.2f}x (identical tokens)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
