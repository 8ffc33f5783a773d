"""FiD reader train-step throughput (tokens/s), ours against transformers T5, same weights.

Our jit step (value_and_grad of the teacher-forced token NLL + clipped AdamW through
`optimization.apply_gradients`) against the same computation in PyTorch (transformers
`T5ForConditionalGeneration`, encoder on the B*K passages, states concatenated per example for
the decoder, torch.optim.AdamW), same config, batch, passages and weights, CPU.

    XLA_FLAGS=--xla_force_host_platform_device_count=1 python -m bench.train_step \
        [--configs tiny,small --steps 5 --dtypes float32,bfloat16 --breakdown --profile N
         --out ...]

Configs are gin/models/{tiny,small}.gin (T5 v1.1, vocab 32128 unless --vocab) with dropout 0.
Both sides start from the same weights (torch's random init copied into ours through
`weights.t5_hf_mapping`); their first-step losses are printed as a correctness check. Our
float32 and bfloat16-compute variants (params float32) and torch float32 run alternately, one
step each per round; the best of `--steps` timed steps is kept (all are in the JSON).
tokens/s = (B*K*L + B*T) / step seconds: every encoder position (pads included) plus every
target position. --breakdown also times forward and forward+backward alone on each side
(optimizer = step - forward+backward); --profile N lists our step's N most expensive XLA ops
(jax.profiler trace). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Sizes per config: a step takes well under a few seconds on a 2-core CPU.
SIZES = {"tiny": dict(batch=4, passages=10, length=128, target_length=16),
         "small": dict(batch=2, passages=5, length=128, target_length=16)}


def our_config(name: str, vocab: int | None, dtype: str):
    """T5Config from gin/models/<name>.gin, dropout 0, compute dtype `dtype`."""
    from atlas_jax import gin_config
    from atlas_jax.models import t5
    gin_config.parse([f"models/{name}.gin"])
    config = t5.T5Config()
    return dataclasses.replace(config, dropout_rate=0.0, dtype=dtype,
                               vocab_size=vocab or config.vocab_size)


def make_torch_model(config, seed: int = 0):
    """transformers T5 v1.1 with our config: gated-GELU (tanh), untied lm_head, no output
    scaling, dropout 0, random init (seeded)."""
    import torch
    from transformers import T5Config as HFT5Config, T5ForConditionalGeneration
    assert tuple(config.mlp_activations) == ("gelu", "linear")
    assert not config.logits_via_embedding and not config.scale_decoder_outputs
    torch.manual_seed(seed)
    hf = HFT5Config(vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim,
                    d_ff=config.mlp_dim, num_layers=config.num_encoder_layers,
                    num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
                    relative_attention_num_buckets=config.relative_attention_num_buckets,
                    relative_attention_max_distance=config.relative_attention_max_distance,
                    layer_norm_epsilon=config.layer_norm_epsilon, dropout_rate=0.0,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    decoder_start_token_id=config.decoder_start_id, pad_token_id=config.pad_id,
                    eos_token_id=config.eos_id)
    model = T5ForConditionalGeneration(hf)
    model.config.scale_decoder_outputs = False
    # transformers 5 always ties lm_head to the embedding; v1.1 is untied (as tests/
    # hf_reference.py does): a separate head, drawn at std d^-0.5 so logits start ~N(0, 1).
    model.lm_head = torch.nn.Linear(config.emb_dim, config.vocab_size, bias=False)
    torch.nn.init.normal_(model.lm_head.weight, std=config.emb_dim ** -0.5)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    return model.train()


def params_from_torch(model, config) -> dict:
    """Our parameter tree (numpy float32) holding the torch model's weights."""
    import jax
    import numpy as np
    from atlas_jax import weights
    state = {k: v.detach().cpu().numpy().astype(np.float32)
             for k, v in model.state_dict().items()}
    abstract = jax.tree_util.tree_flatten_with_path(weights.t5_abstract_params(config))[0]
    shapes = {"/".join(k.key for k in path): tuple(x.shape) for path, x in abstract}
    tree: dict = {}
    for ours, (theirs, transform) in weights.t5_hf_mapping(config).items():
        value = np.ascontiguousarray(transform(state[theirs]))
        assert value.shape == shapes[ours], (ours, value.shape, shapes[ours])
        node = tree
        *parents, leaf = ours.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    assert len(shapes) == len(weights.t5_hf_mapping(config))
    return tree


def make_batch(config, sizes: dict, seed: int = 0) -> dict:
    """Random ids in [2, vocab); every passage row but the first (of all B*K) and every
    target row but the first get a pad (0) tail from a random point in [n/2, n). Returns
    numpy arrays."""
    import numpy as np
    from tests.hf_reference import random_ids
    rng = np.random.default_rng(seed)
    b, k, n, t = (sizes[x] for x in ("batch", "passages", "length", "target_length"))
    passages = random_ids(rng, b * k, n, config.vocab_size).reshape(b, k, n)
    targets = random_ids(rng, b, t, config.vocab_size)
    decoder_input_ids = np.concatenate([np.full((b, 1), config.decoder_start_id, np.int32),
                                        targets[:, :-1]], axis=1)  # = t5.shift_right
    return {"passages": passages, "targets": targets, "target_mask": targets != 0,
            "decoder_input_ids": decoder_input_ids}


def optimizer_settings(args) -> dict:
    return dict(lr=args.lr, weight_decay=0.01, clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)


def prepare_ours(config, params_np: dict, batch_np: dict, opt: dict):
    """Our jit step (params and optimizer state donated, as torch updates in place).
    Returns (compile seconds, step () -> loss float, parts () -> {name: timed callable} for
    --breakdown, step memory MB or None, the compiled step)."""
    import jax
    import jax.numpy as jnp
    from atlas_jax.train import objectives, optimization
    from atlas_jax.models import fid

    model = fid.FusionInDecoder(config)
    optimizer = optimization.make_optimizer(
        optimization.OptimizerConfig(reader_learning_rate=opt["lr"], schedule="constant",
                                     weight_decay=opt["weight_decay"], b1=opt["b1"],
                                     b2=opt["b2"], eps=opt["eps"], clip_norm=opt["clip_norm"]),
        {"reader": params_np})
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}

    def loss_fn(params, batch):
        logits = model.apply({"params": params["reader"]}, batch["passages"],
                             batch["decoder_input_ids"])
        nll = objectives.target_token_nll(logits, batch["targets"], batch["target_mask"])
        return nll.sum() / batch["target_mask"].sum()

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        params, opt_state, _ = optimization.apply_gradients(optimizer, grads, opt_state,
                                                            params, loss)
        return params, opt_state, loss

    params = {"reader": jax.tree.map(jnp.array, params_np)}
    opt_state = optimizer.init(params)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
    compile_seconds = time.perf_counter() - t0
    memory = None
    try:
        analysis = compiled.memory_analysis()
        memory = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
                  + analysis.output_size_in_bytes - analysis.alias_size_in_bytes) / 2 ** 20
    except Exception:  # not every backend / version reports it
        pass
    state = {"params": params, "opt_state": opt_state}

    def run() -> float:
        state["params"], state["opt_state"], loss = compiled(state["params"],
                                                             state["opt_state"], batch)
        return float(loss)  # blocks

    forward = jax.jit(loss_fn)
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))

    def parts():
        p = state["params"]
        jax.block_until_ready(value_and_grad(p, batch))  # compiles
        jax.block_until_ready(forward(p, batch))
        return {"forward": lambda: jax.block_until_ready(forward(p, batch)),
                "forward+backward": lambda: jax.block_until_ready(value_and_grad(p, batch))}

    return compile_seconds, run, parts, memory, compiled


def prepare_torch(model, batch_np: dict, opt: dict):
    """FiD step in torch: encoder on (B*K, L), states reshaped to (B, K*L, d), mask to
    (B, K*L), decoder through `encoder_outputs`; token NLL mean; clip 1.0; AdamW with weight
    decay on the Linear weights only (ours: kernels, not embeddings / norm scales / relpos).
    Returns (step () -> loss float, parts)."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    passages = torch.from_numpy(batch_np["passages"]).long()
    b, k, n = passages.shape
    flat = passages.reshape(b * k, n)
    mask = flat != 0
    decoder_input_ids = torch.from_numpy(batch_np["decoder_input_ids"]).long()
    labels = torch.from_numpy(batch_np["targets"]).long().masked_fill(
        ~torch.from_numpy(batch_np["target_mask"]), -100)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if ("layer_norm" in name or "relative_attention_bias" in name
                      or name.startswith("shared") or "embed_tokens" in name) else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opt["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=opt["lr"], betas=(opt["b1"], opt["b2"]), eps=opt["eps"])

    def loss_fn():
        states = model.encoder(input_ids=flat, attention_mask=mask).last_hidden_state
        states = states.reshape(b, k * n, states.shape[-1])
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=states),
                    attention_mask=mask.reshape(b, k * n), decoder_input_ids=decoder_input_ids)
        logits = out.logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 labels.reshape(-1), ignore_index=-100)

    def run() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt["clip_norm"])
        optimizer.step()
        return float(loss.detach())

    def parts():
        def forward():
            with torch.no_grad():
                loss_fn()

        def forward_backward():
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
        return {"forward": forward, "forward+backward": forward_backward}

    return run, parts


def profile_ours(title: str, compiled, run, steps: int, top: int) -> list[str]:
    """Lines naming our step's most expensive XLA ops (time per step summed over threads, from a
    jax.profiler trace of `steps` steps) with the jax operation each comes from, and the
    totals by phase (forward, backward = transpose(jvp), optimizer = the rest)."""
    import collections
    import re
    import tempfile
    import jax
    meta = {}
    for line in compiled.as_text().splitlines():
        m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (\S+) [\w\-]+\(.*?op_name="([^"]*)"', line)
        if m and m.group(1) not in meta:
            meta[m.group(1)] = (m.group(2), m.group(3))
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for _ in range(steps):
                run()
        trace = next(Path(folder).rglob("*.xplane.pb"))
        data = jax.profiler.ProfileData.from_file(str(trace))
    total = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if event.name in meta:
                    total[event.name] += event.duration_ns / steps / 1e6
    phases = collections.Counter()
    for op, ms in total.items():
        jax_op = meta[op][1]
        phases["backward" if "transpose(jvp(" in jax_op else
               "forward" if "FusionInDecoder" in jax_op or "jvp(" in jax_op else
               "optimizer"] += ms
    lines = [f"\nprofile of our {title} step: ms per step summed over threads ("
             + ", ".join(f"{k} {v:.1f}" for k, v in phases.most_common()) + ")"]
    for op, ms in total.most_common(top):
        shape, jax_op = meta[op]
        lines.append(f"{ms:8.2f}  {op:<26} {shape:<28} {jax_op[-100:]}")
    return lines


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_config(name: str, args) -> tuple[list[dict], list[dict], list[str]]:
    import jax
    import numpy as np

    sizes = SIZES[name]
    dtypes = args.dtypes.split(",")
    base = our_config(name, args.vocab, "float32")
    batch = make_batch(base, sizes)
    torch_model = make_torch_model(base)
    params_np = params_from_torch(torch_model, base)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params_np))
    opt = optimizer_settings(args)

    sides, compile_s, first_loss, second_loss, memory, parts, compiled = ({} for _ in range(7))
    for dtype in dtypes:
        key = f"ours_{dtype}"
        compile_s[key], run, parts[key], memory[key], compiled[key] = prepare_ours(
            dataclasses.replace(base, dtype=dtype), params_np, batch, opt)
        warm, first_loss[key] = timed(run)  # first step: the initial weights' loss
        compile_s[key] += warm
        second_loss[key] = run()
        sides[key] = run
    run, parts["torch"] = prepare_torch(torch_model, batch, opt)
    compile_s["torch"], first_loss["torch"] = timed(run)
    second_loss["torch"] = run()
    sides["torch"] = run

    seconds = {key: [] for key in sides}
    for _ in range(args.steps):  # alternate sides, one step each per round
        for key, fn in sides.items():
            seconds[key].append(timed(fn)[0])

    breakdown = []
    if args.breakdown:
        fns = {key: make() for key, make in parts.items()}
        part_seconds = {key: {part: [] for part in fns[key]} for key in fns}
        for _ in range(args.steps):
            for key in fns:
                for part, fn in fns[key].items():
                    part_seconds[key][part].append(timed(fn)[0])
        for key in fns:
            best = {part: min(v) for part, v in part_seconds[key].items()}
            breakdown.append({"config": name, "side": key,
                              "forward_ms": 1e3 * best["forward"],
                              "backward_ms": 1e3 * (best["forward+backward"] - best["forward"]),
                              "forward_backward_ms": 1e3 * best["forward+backward"],
                              "optimizer_ms": 1e3 * (min(seconds[key])
                                                     - best["forward+backward"]),
                              "step_ms": 1e3 * min(seconds[key])})
    profile = []
    if args.profile:
        for dtype in dtypes:
            key = f"ours_{dtype}"
            profile += profile_ours(f"{name} {dtype}", compiled[key], sides[key], args.steps,
                                    args.profile)

    tokens = (sizes["batch"] * sizes["passages"] * sizes["length"]
              + sizes["batch"] * sizes["target_length"])
    torch_best = min(seconds["torch"])
    rows = []
    for dtype in dtypes:
        key = f"ours_{dtype}"
        ours_best = min(seconds[key])
        rows.append({
            "config": name, "dtype": dtype, **sizes, "vocab": base.vocab_size,
            "parameters": n_params, "tokens_per_step": tokens,
            "ours_step_ms": 1e3 * ours_best, "torch_step_ms": 1e3 * torch_best,
            "ours_tokens_per_s": tokens / ours_best, "torch_tokens_per_s": tokens / torch_best,
            "ratio": torch_best / ours_best,
            "ratio_of_medians": (statistics.median(seconds["torch"])
                                 / statistics.median(seconds[key])),
            "ours_median_step_ms": 1e3 * statistics.median(seconds[key]),
            "torch_median_step_ms": 1e3 * statistics.median(seconds["torch"]),
            "ours_all_step_ms": [1e3 * s for s in seconds[key]],
            "torch_all_step_ms": [1e3 * s for s in seconds["torch"]],
            "ours_compile_s": compile_s[key], "torch_first_step_s": compile_s["torch"],
            "first_loss_ours": first_loss[key], "first_loss_torch": first_loss["torch"],
            "second_loss_ours": second_loss[key], "second_loss_torch": second_loss["torch"],
            # XLA's memory_analysis of the step: arguments + outputs + temporaries - aliased
            "ours_step_memory_mb": memory[key],
            "torch_attention": torch_model.config._attn_implementation,
        })
    return rows, breakdown, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="our compute dtypes (params float32); torch is float32")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocab size on both sides (default: the gin file's, 32128)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps per side, alternating (best is kept)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time forward and forward+backward alone (optimizer = "
                        "step - forward+backward)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N most expensive XLA ops of our step")
    parser.add_argument("--out", default="bench/results/train_step.json")
    args = parser.parse_args()

    import jax
    import torch
    torch.set_num_threads(os.cpu_count())

    rows, breakdown, profile = [], [], []
    for name in args.configs.split(","):
        r, b, p = bench_config(name, args)
        rows += r
        breakdown += b
        profile += p

    print(f"{'config':<6} {'dtype':<9} {'B x K x L, T':<15} {'ours ms':>8} {'torch ms':>9} "
          f"{'ours tok/s':>10} {'torch tok/s':>11} {'ours/torch':>10} {'compile s':>9} "
          f"{'loss ours':>10} {'loss torch':>10} {'|diff|':>8}")
    for r in rows:
        shape = f"{r['batch']}x{r['passages']}x{r['length']}, {r['target_length']}"
        print(f"{r['config']:<6} {r['dtype']:<9} {shape:<15} {r['ours_step_ms']:>8.1f} "
              f"{r['torch_step_ms']:>9.1f} {r['ours_tokens_per_s']:>10.0f} "
              f"{r['torch_tokens_per_s']:>11.0f} {r['ratio']:>9.2f}x "
              f"{r['ours_compile_s']:>9.1f} {r['first_loss_ours']:>10.5f} "
              f"{r['first_loss_torch']:>10.5f} "
              f"{abs(r['first_loss_ours'] - r['first_loss_torch']):>8.1e}")
    print(f"(best of {args.steps} alternating steps; tokens = B*K*L + B*T incl. pads; vocab "
          f"{rows[0]['vocab']}; torch float32, {torch.get_num_threads()} threads, attention "
          f"'{rows[0]['torch_attention']}'; second-step losses (after one AdamW update): "
          + ", ".join(f"{r['config']}/{r['dtype']} {r['second_loss_ours']:.5f} vs "
                      f"{r['second_loss_torch']:.5f}" for r in rows) + ")")
    if breakdown:
        print(f"\n{'config':<6} {'side':<15} {'forward':>8} {'backward':>9} {'optimizer':>9} "
              f"{'step':>8}  (ms, best of {args.steps}; backward = fwd+bwd - fwd)")
        for b in breakdown:
            print(f"{b['config']:<6} {b['side']:<15} {b['forward_ms']:>8.1f} "
                  f"{b['backward_ms']:>9.1f} {b['optimizer_ms']:>9.1f} {b['step_ms']:>8.1f}")
    for line in profile:
        print(line)

    summary = {"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "timing": f"best of {args.steps}",
               "tokens": "B*K*L + B*T (padded positions included)",
               "train_step": rows}
    if breakdown:
        summary["breakdown"] = breakdown
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps({"train_step": [{k: r[k] for k in (
        "config", "dtype", "ours_step_ms", "torch_step_ms", "ratio")} for r in rows]}))


if __name__ == "__main__":
    main()
