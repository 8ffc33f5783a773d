"""An independent numpy computation of the ADist passage masses (Izacard & Grave 2021,
"Distilling knowledge from reader to retriever"): for every decoder cross-attention layer,
the attention probability of each target token on each encoder token times the L2 norm of
that token's value vector, summed over heads, layers, real target tokens and the passage's
tokens. Only the attention's inputs and its query/key/value kernels are taken from the model
(recorded with `flax.linen.intercept_methods`); the projections, softmax, mask and sums are
redone here in float64."""
import inspect

import jax
import numpy as np
from flax import linen as nn

from atlas_jax.models import t5


def _project(inputs, params, heads, head_dim):
    out = np.asarray(inputs, np.float64) @ np.asarray(params["kernel"], np.float64)
    if "bias" in params:
        out = out + np.asarray(params["bias"], np.float64)
    return out.reshape(out.shape[:2] + (heads, head_dim))


def adist_masses(model, params, passage_ids, decoder_input_ids, target_mask=None):
    """(batch, K) masses of `model` (a fid.FusionInDecoder) on `passage_ids` (B, K, L)."""
    calls = []
    signature = inspect.signature(t5.MultiHeadAttention.__call__)

    def record(next_fun, args, kwargs, context):
        module = context.module
        if (isinstance(module, t5.MultiHeadAttention) and module.is_cross_attention
                and context.method_name == "__call__"):
            bound = signature.bind(module, *args, **kwargs).arguments
            calls.append((np.asarray(bound["inputs_q"]), np.asarray(bound["inputs_kv"]),
                          np.asarray(bound["mask"]),
                          jax.tree.map(np.asarray, dict(module.variables["params"])),
                          module.num_heads, module.head_dim))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply({"params": params}, passage_ids, decoder_input_ids)
    assert calls, "no cross-attention call recorded"
    batch, k, length = passage_ids.shape
    total = np.zeros((batch, decoder_input_ids.shape[1], k * length))
    for inputs_q, inputs_kv, mask, p, heads, head_dim in calls:
        query = _project(inputs_q, p["query"], heads, head_dim)
        key = _project(inputs_kv, p["key"], heads, head_dim)
        value = _project(inputs_kv, p["value"], heads, head_dim)
        logits = np.einsum("bqhd,bkhd->bhqk", query, key)
        logits = np.where(np.broadcast_to(mask, logits.shape), logits, -np.inf)
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=-1, keepdims=True)
        value_norm = np.sqrt((value ** 2).sum(axis=-1))                    # (b, kv, h)
        total += np.einsum("bhqk,bkh->bqk", probs, value_norm)
    if target_mask is not None:
        total *= np.asarray(target_mask, np.float64)[..., None]
    return total.sum(axis=1).reshape(batch, k, length).sum(axis=-1)
