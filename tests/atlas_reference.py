"""Atlas reference checkpoints (`model.pth.tar`) written with torch in the reference's layout
(src/model_io.py save_atlas_model): {"step", "model", "opt", "optimizer", "scheduler",
"retr_optimizer", "retr_scheduler"}; reader keys `reader.*` (Hugging Face T5 names), retriever
keys `retriever.contriever.*` or `retriever.{query,passage}_contriever.*` (BERT names, with
the persistent `embeddings.position_ids` buffer), optionally `module.` after the first part."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "paid", "to", "on", "for",
         "groceries", "rent", "coffee", "kin", "soy", "usd", "eur", "jan", "feb", "who", "what",
         "was", "how", "much", "did", "i", "spend", "##s", "##ed", ".", ",", "?", "1", "2", "3",
         "4", "5", "0", "balance", "account", "bank", "checking", "salary", "restaurant"]


def write_vocab(path: Path) -> Path:
    path.write_text("\n".join(WORDS) + "\n")
    return path


def make_contriever(seed: int, hidden=32, layers=2, heads=2) -> BertModel:
    """A random BERT as Atlas's Contriever builds it (no pooler), in eval mode."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden,
                        max_position_embeddings=64)
    model = BertModel(config, add_pooling_layer=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def contriever_embed(model: BertModel, ids, mask):
    """Contriever's 'average' pooling, no normalisation."""
    with torch.no_grad():
        ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = hidden.masked_fill(~mask[..., None].bool(), 0.0)
        return (hidden.sum(dim=1) / mask.sum(dim=1)[..., None]).numpy()


def _tower(model: BertModel) -> dict:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["embeddings.position_ids"] = torch.arange(
        model.config.max_position_embeddings).expand((1, -1)).clone()
    return sd


def write_atlas_checkpoint(path: Path, reader, query, passage=None, module: bool = False,
                           step: int = 100) -> Path:
    """reader: a transformers T5ForConditionalGeneration; query (and passage for the untied
    layout): Contriever BertModels."""
    def prefixed(first: str, rest: str) -> str:
        return f"{first}.module.{rest}" if module else f"{first}.{rest}"

    model = {prefixed("reader", k): v.detach().clone() for k, v in reader.state_dict().items()}
    towers = {"contriever": query} if passage is None else {"query_contriever": query,
                                                            "passage_contriever": passage}
    for name, tower in towers.items():
        model.update({prefixed("retriever", f"{name}.{k}"): v for k, v in _tower(tower).items()})
    first = next(iter(model.values()))
    opt = argparse.Namespace(name="my_exp", text_maxlength=64, n_context=4,
                             reader_model_type="google/t5-base-lm-adapt",
                             query_side_retriever_training=passage is not None)
    optimizer = {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros_like(first),
                               "exp_avg_sq": torch.zeros_like(first)}},
                 "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "model": model, "optimizer": optimizer, "retr_optimizer": None,
                "scheduler": {"last_epoch": step, "_step_count": step + 1, "lr_lambdas": [None]},
                "retr_scheduler": None, "opt": opt}, path)
    return path


def write_atlas_saved_index(folder: Path, records: list[dict], embeddings, shards: int) -> Path:
    """The reference's DistributedIndex.save_index: one [dim, N] float16 tensor, shard k
    saved as the view embeddings[:, a:b] (torch.save keeps the whole storage, an offset and
    strides) and its passages as a plain pickle."""
    import pickle
    folder.mkdir(parents=True, exist_ok=True)
    matrix = torch.as_tensor(embeddings).T.to(torch.float16).contiguous()   # [dim, N]
    per_shard = -(-len(records) // shards)
    for k in range(shards):
        a, b = k * per_shard, min(len(records), (k + 1) * per_shard)
        torch.save(matrix[:, a:b], folder / f"embeddings.{k}.pt")
        with open(folder / f"passages.{k}.pt", "wb") as f:
            pickle.dump(records[a:b], f, protocol=pickle.HIGHEST_PROTOCOL)
    return folder
