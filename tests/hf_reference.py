"""Tiny Hugging Face T5 reference models written to disk in the three folder shapes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import T5Config as HFT5Config, T5ForConditionalGeneration


# Folder shapes and head / d_kv / bucket settings the parity test and bench.parity cover.
T5_PARITY_CASES = [
    dict(version="v1.0"),
    dict(version="v1.1"),
    dict(version="tf5"),
    dict(version="v1.0", num_heads=2, d_kv=16, num_buckets=8, max_distance=16),
    dict(version="v1.1", num_heads=6, d_kv=4, num_buckets=16, max_distance=20,
         num_decoder_layers=3),
]


def make_hf_t5(folder: Path, *, version: str, d_model=32, d_kv=8, num_heads=4, d_ff=48,
               num_layers=2, num_decoder_layers=None, num_buckets=32, max_distance=128,
               vocab_size=96, seed=0) -> T5ForConditionalGeneration:
    """Random tiny T5 saved as `version`: 'v1.0' (tied, scaled), 'v1.1' (hub layout: untied
    lm_head.weight, tie_word_embeddings false) or 'tf5' (transformers-5 save_pretrained:
    tie_word_embeddings true, scale_decoder_outputs false, no lm_head). Returns the torch
    model that those files describe, in eval mode."""
    torch.manual_seed(seed)
    config = HFT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff,
                        num_layers=num_layers, num_decoder_layers=num_decoder_layers,
                        num_heads=num_heads, relative_attention_num_buckets=num_buckets,
                        relative_attention_max_distance=max_distance,
                        feed_forward_proj="relu" if version == "v1.0" else "gated-gelu",
                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():  # move every weight (norm scales included) off its init value
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    untied = version == "v1.1"
    if untied:
        model.lm_head = torch.nn.Linear(d_model, vocab_size, bias=False)
        torch.nn.init.normal_(model.lm_head.weight, std=0.25)
    model.config.scale_decoder_outputs = version == "v1.0"
    model.eval()

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
               if "embed_tokens" not in k and (untied or k != "lm_head.weight")}
    save_file(tensors, str(folder / "model.safetensors"))
    hf = config.to_dict()
    hf.pop("scale_decoder_outputs", None)
    if version == "v1.0":
        hf["tie_word_embeddings"] = True
    elif version == "v1.1":
        hf["tie_word_embeddings"] = False
    else:
        hf.update(tie_word_embeddings=True, scale_decoder_outputs=False)
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    return model


def random_ids(rng: np.random.Generator, batch: int, length: int, vocab: int,
               pad_tail: bool = True) -> np.ndarray:
    """Token ids in [2, vocab) with a random-length pad (0) tail on each row but the first."""
    ids = rng.integers(2, vocab, size=(batch, length)).astype(np.int32)
    if pad_tail:
        for row in range(1, batch):
            ids[row, rng.integers(length // 2, length):] = 0
    return ids


def minilm_reference(texts: list[str], folder: str, max_length: int = 256):
    """transformers BertModel + masked mean pooling + L2 normalisation (what
    sentence-transformers computes for all-MiniLM-L6-v2). Returns (embeddings, input ids)."""
    from transformers import AutoTokenizer, BertModel
    batch = AutoTokenizer.from_pretrained(folder)(texts, padding=True, truncation=True,
                                                  max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        states = BertModel.from_pretrained(folder).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    pooled = (states * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy(), batch["input_ids"].numpy()
