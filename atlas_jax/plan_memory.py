"""`atlas-jax plan`'s per-device memory model: what one train step holds on an accelerator.

XLA:CPU's buffer assignment (the compiled numbers `plan` also prints) keeps the whole
backward pass live and ignores rematerialisation, so it cannot say what fits on a TPU or GPU.
This model adds up, per device:

  params         every parameter group at its sharded shape (exact: the shardings `plan`
                 places them with) and dtype (float32)
  optimizer      the AdamW moments and counters at their shardings (exact)
  gradients      one float32 gradient per *trained* parameter, sharded like it
  activations    what the forward pass keeps for the backward, layer by layer, under each
                 stack's remat policy (`REMAT_SAVED`): reader encoder (batch/data x n_context x
                 reader length tokens), decoder (target tokens; cross-attention keys/values
                 over every source token), and the trained retriever towers (queries; the
                 passages too unless query-side); heads, mlp and vocab split over `model`
  working set    the largest single layer's full activations (its backward recomputes /
                 holds them), plus the logits, their log-softmax and gradient
  index          the index shard (passages / devices rows)
  collectives    FSDP: two all-gathered copies of the largest layer's parameters (in use and
                 prefetched); otherwise one layer's gradient for the all-reduce

Activations are per token counts of the tensors each policy saves (compute dtype; attention
probabilities/logits float32), summed over layers. The model omits XLA's fusion choices,
padding to tile sizes, the evaluation / generation programs and the runtime's own reserve:
read it as the step's floor plus the usual ~10% framework overhead.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from atlas_jax.models import stacking

GIB = 2 ** 30
ACCELERATORS = (("16 GiB (TPU v5e, V100-16)", 16), ("32 GiB (TPU v4, V100-32)", 32),
                ("80 GiB (A100/H100)", 80), ("141 GiB (H200)", 141))


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One transformer layer, per device."""
    d: int              # model width (embed: never split for activations)
    heads: int          # attention heads on this device
    head_dim: int
    mlp: int            # mlp width on this device
    n_acts: int         # MLP input projections (2 for gated GELU)
    dtype_bytes: int


def _split(size: int, parts: int) -> int:
    return size // parts if size % parts == 0 else size


def saved_per_token(layer: LayerShape, policy: str, attended: int, cross: int = 0) -> float:
    """Bytes one token keeps for the backward in one layer under `policy`.

    attended: keys each query attends to (self-attention); cross: source tokens of a decoder
    layer's cross-attention (0 for encoder layers)."""
    d, hd, f, a = layer.d, layer.heads * layer.head_dim, layer.mlp, layer.n_acts
    attention_f32 = 4 * layer.heads * (attended + cross)     # logits or probabilities
    blocks = 2 if cross else 1                               # attention blocks in the layer
    if policy == "full":                                     # the layer's input only
        return d * layer.dtype_bytes
    if policy == "save_dots_no_batch":                       # projections, not q.k / p.v
        elements = d + blocks * (3 * hd + d) + a * f + d
        return elements * layer.dtype_bytes
    if policy == "save_dots":                                # every matmul output
        elements = d + blocks * (4 * hd + d) + a * f + d
        return elements * layer.dtype_bytes + attention_f32
    # none: inputs of every op of the backward (norms, projections, activations, residuals)
    elements = (1 + blocks) * 2 * d + blocks * 4 * hd + 2 * a * f + d
    return elements * layer.dtype_bytes + 2 * attention_f32


def _policy(remat: Any) -> str:
    enabled, _ = stacking.remat_policy(remat)
    name = {False: "none", True: "full"}.get(remat, remat) if isinstance(remat, bool) else remat
    return name if enabled else "none"


def _sharded_bytes(tree: Any) -> int:
    import jax
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return int(total)


def _layer_params(tree: Any) -> int:
    """Per-device bytes of the largest single layer of a parameter group."""
    import jax
    best = 0
    for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, dict)
                                and any(str(k).startswith("layers") for k in x)):
        if not isinstance(node, dict):
            continue
        for key, layer in node.items():
            if str(key).startswith("layers"):
                size = _sharded_bytes(layer)
                best = max(best, size // max(1, _depth(layer)) if key == "layers" else size)
    return best


def _depth(stacked: Any) -> int:
    import jax
    leaves = jax.tree.leaves(stacked)
    return int(leaves[0].shape[0]) if leaves else 1


@dataclasses.dataclass(frozen=True)
class StepModel:
    """The inputs of the activation model (everything per device)."""
    examples: int               # examples per device (batch / data)
    n_context: int
    retrieved: int
    reader_length: int
    target_length: int
    query_length: int
    passage_length: int
    model_axis: int
    passage_tower_trained: bool
    retriever_trained: bool


def activation_bytes(step: StepModel, reader: Any, retriever: Any) -> dict[str, float]:
    """{'saved': bytes kept across the step, 'working': the largest layer + logits}."""
    m = step.model_axis
    rdt = np.dtype(reader.dtype).itemsize
    layer = LayerShape(reader.emb_dim, _split(reader.num_heads, m), reader.head_dim,
                       _split(reader.mlp_dim, m), len(reader.mlp_activations), rdt)
    policy = _policy(reader.remat)
    source = step.n_context * step.reader_length
    enc_tokens = step.examples * source
    dec_tokens = step.examples * step.target_length
    enc = enc_tokens * saved_per_token(layer, policy, step.reader_length)
    dec = dec_tokens * saved_per_token(layer, policy, step.target_length, cross=source)
    cross_kv = 0 if policy == "full" else 2 * layer.heads * layer.head_dim * rdt * enc_tokens
    saved = (reader.num_encoder_layers * enc + reader.num_decoder_layers * (dec + cross_kv)
             + enc_tokens * reader.emb_dim * rdt)          # the encoded states, once
    working = [enc_tokens * saved_per_token(layer, "none", step.reader_length),
               dec_tokens * saved_per_token(layer, "none", step.target_length, cross=source)
               + 2 * layer.heads * layer.head_dim * rdt * enc_tokens]
    logits = 3 * dec_tokens * _split(reader.vocab_size, m) * 4
    if step.retriever_trained:
        tdt = np.dtype(retriever.dtype).itemsize
        heads = _split(retriever.num_heads, m)
        head_dim = (retriever.head_dim if retriever.architecture == "t5"
                    else retriever.hidden_size // retriever.num_heads)
        tower = LayerShape(retriever.hidden_size, heads, head_dim, _split(retriever.mlp_dim, m),
                           len(retriever.mlp_activations) if retriever.architecture == "t5"
                           else 1, tdt)
        tower_policy = _policy(retriever.remat)
        runs = [(step.examples, step.query_length)]
        if step.passage_tower_trained:
            runs.append((step.examples * step.retrieved, step.passage_length))
        for sequences, length in runs:
            tokens = sequences * length
            saved += retriever.num_layers * tokens * saved_per_token(tower, tower_policy, length)
            working.append(tokens * saved_per_token(tower, "none", length))
    return {"saved": float(saved), "working": float(max(working) + logits)}


def model_memory(state: Any, opt_state: Any, step: StepModel, reader: Any, retriever: Any,
                 fsdp: bool, index_bytes: int) -> dict[str, int]:
    """The per-device bytes of each component, and their total."""
    trained = {k: v for k, v in state.params.items() if not k.startswith("frozen")}
    largest = max(_layer_params(group) for group in state.params.values())
    acts = activation_bytes(step, reader, retriever)
    parts = {"params": _sharded_bytes(state.params), "optimizer": _sharded_bytes(opt_state),
             "gradients": _sharded_bytes(trained), "activations": int(acts["saved"]),
             "working_set": int(acts["working"]), "index": int(index_bytes),
             "collectives": int(2 * largest * state.mesh.shape["data"] if fsdp else largest)}
    parts["total"] = sum(parts.values())
    return parts


def verdicts(parts: dict[str, int], step: StepModel, reader: Any, retriever: Any,
             data_axis: int) -> list[dict[str, Any]]:
    """For each accelerator: fits at the configured batch?, and the largest per-device batch
    that fits (activations and working set scale with the examples per device)."""
    fixed = parts["total"] - parts["activations"] - parts["working_set"]
    one = activation_bytes(dataclasses.replace(step, examples=1), reader, retriever)
    per_example = one["saved"] + one["working"]
    rows = []
    for name, gib in ACCELERATORS:
        capacity = gib * GIB
        largest = int((capacity - fixed) // per_example) if capacity > fixed else 0
        rows.append({"accelerator": name, "capacity_gib": gib,
                     "fits": parts["total"] <= capacity,
                     "headroom_gib": round((capacity - parts["total"]) / GIB, 2),
                     "max_examples_per_device": largest,
                     "max_global_batch": largest * data_axis})
    return rows


def format_memory(parts: dict[str, int], rows: list[dict[str, Any]], step: StepModel) -> str:
    """The model's components and the verdict table, aligned."""
    lines = [f"memory model per device ({step.examples} examples per device):"]
    for key in ("params", "optimizer", "gradients", "activations", "working_set", "index",
                "collectives", "total"):
        lines.append(f"  {key:<12} {parts[key] / GIB:9.2f} GiB")
    lines.append("  accelerator                  fits  headroom GiB  max examples/device "
                 "(global batch)")
    for row in rows:
        lines.append(f"  {row['accelerator']:<28} {'yes' if row['fits'] else 'no':<5} "
                     f"{row['headroom_gib']:>12.2f}  {row['max_examples_per_device']:>6} "
                     f"({row['max_global_batch']})")
    return "\n".join(lines)
