"""Answering with trained parameters, jit on the device mesh: restore a run's parameters
without its optimizer state, embed queries, search an index (filters, hybrid), generate and
score answers. `atlas-jax ask` / `serve` (`ledger/qa.py`), the demo's evaluation and the
trainer's evaluation all run these functions (docs/design.md, "Module map").

The jit functions are built once per `train.state.ModelState` (cached in its `compiled`):
`embed_fn` (the retriever towers, through `towers`, the one embedding path), `generate_fn`
(FiD decoding over a KV cache: greedy, the best beam, or all beams for an
`answer_selector`), `score_fn` (teacher-forced token log-likelihoods).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax import checkpoints, distributed, partitioning, towers
from atlas_jax.models import decoding
from atlas_jax.train.state import ModelState

PAD_ID, EOS_ID = 0, 1


def embed_fn(state: ModelState, tower: str) -> Callable:
    """(retriever params, ids, mask) -> (B, D) float32 numpy, batch over 'data'."""
    if ("embed", tower) not in state.compiled:
        config = state.retriever.config

        def call(params, ids, mask):
            return towers.embed_tokens(config, params, ids, mask, tower, state.mesh,
                                       state.rules)
        state.compiled["embed", tower] = call
    return state.compiled["embed", tower]


def generate_fn(state: ModelState, max_length: int, beam_size: int = 1,
                all_beams: bool = False) -> Callable:
    """(reader params, reader ids (B, K, L)) -> answer tokens (B, max_length) numpy: greedy,
    or the best of `beam_size` beams (beam search, GNMT length penalty 0.6). `all_beams`:
    (tokens (B, beam_size, max_length), scores (B, beam_size)) numpy, best first; a score
    <= `decoding.NEG_INF / 2` marks a slot no hypothesis filled."""
    key = ("generate", max_length, beam_size, all_beams)
    if key not in state.compiled:
        model = state.models.reader

        @jax.jit
        def generate(params, passage_ids):
            if beam_size == 1 and not all_beams:
                return decoding.generate_from_passages(model, params, passage_ids, max_length)
            sequences, scores = decoding.generate_from_passages(model, params, passage_ids,
                                                                max_length, beam_size)
            return (sequences, scores) if all_beams else sequences[:, 0]

        def call(params, passage_ids):
            with jax.set_mesh(state.mesh), nn.logical_axis_rules(state.rules):
                out = generate(params, jax.device_put(
                    passage_ids, partitioning.batch_sharding(state.mesh, 3)))
            return jax.tree.map(distributed.host_array, out)
        state.compiled[key] = call
    return state.compiled[key]


def decode_answer(vocabulary: Any, tokens: Sequence[int]) -> str:
    """The answer text of generated tokens (up to EOS; sentinels dropped)."""
    from atlas_jax.vocabulary import strip_sentinels
    tokens = list(tokens)
    tokens = tokens[:tokens.index(EOS_ID)] if EOS_ID in tokens else tokens
    return strip_sentinels(vocabulary.decode(tokens))


def evidence_of(store: Any, rows: Sequence[int]) -> list[dict]:
    """The passages of store rows `rows` (-1 skipped) as {"id", "text", "metadata"}: what an
    `answer_selector` is given as the evidence read."""
    return [{"id": store.ids[r], "text": store.texts[r], "metadata": store.metadata[r] or {}}
            for r in map(int, rows) if r >= 0]


def select_answers(selector: Callable | None, questions: Sequence[str],
                   beams: Sequence[Sequence[str]], scores: np.ndarray,
                   evidence: Sequence[Sequence[dict]], store: Any) -> list[int]:
    """The beam each question answers with: `selector(questions, beams, evidence, store)`
    (`TrainConfig.answer_selector`) over the filled beams (best first), else the best beam."""
    if selector is None:
        return [0] * len(beams)
    filled = [[text for text, score in zip(texts, row) if score > decoding.NEG_INF / 2]
              or list(texts[:1]) for texts, row in zip(beams, np.asarray(scores))]
    chosen = [int(c) for c in selector(list(questions), filled, list(evidence), store)]
    if len(chosen) != len(beams) or any(not 0 <= c < len(f) for c, f in zip(chosen, filled)):
        raise ValueError(f"answer_selector {selector!r} chose beams {chosen} for "
                         f"{[len(f) for f in filled]} filled beams")
    return chosen


def score_fn(state: ModelState) -> Callable:
    """(reader params, reader ids (B, K, L), targets (B, T)) -> (B, T) log p of each target
    token given the passages and the tokens before it (teacher forcing)."""
    if "score" not in state.compiled:
        model = state.models.reader

        @jax.jit
        def score(params, reader_ids, targets):
            decoder_inputs = jnp.concatenate(
                [jnp.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
            logits = model.apply({"params": params}, reader_ids, decoder_inputs,
                                 deterministic=True)
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

        def call(params, reader_ids, targets):
            with jax.set_mesh(state.mesh), nn.logical_axis_rules(state.rules):
                out = score(params, jax.device_put(
                    reader_ids, partitioning.batch_sharding(state.mesh, 3)),
                    jax.device_put(targets, partitioning.batch_sharding(state.mesh, 2)))
            return distributed.host_array(out)
        state.compiled["score"] = call
    return state.compiled["score"]


def restore_params(checkpoint_dir: str | Path, state: ModelState, step: int | None = None
                   ) -> tuple[dict, int]:
    """(the parameters of `step` (default: the latest) placed like `state.params`, the step);
    the optimizer state is not read. FileNotFoundError when there is no checkpoint."""
    ckpt = checkpoints.Checkpoints(checkpoint_dir, max_to_keep=None)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{Path(checkpoint_dir)}: no checkpoint")
        restored, _ = ckpt.restore(step, {"params": state.params}, partial=True)
    finally:
        ckpt.close()
    return restored["params"], step


@dataclasses.dataclass(frozen=True)
class Inference:
    """A run's models and parameters for answering (see the module docstring)."""
    state: ModelState
    vocabulary: Any               # the reader's SentencePiece vocabulary
    query_length: int             # retriever query tokens
    reader_length: int            # reader tokens per passage
    target_length: int            # answer tokens generated
    n_context: int                # passages the reader reads
    beam_size: int = 1            # answer decoding: 1 greedy, else beam search (best beam)
    answer_selector: Any = None   # `TrainConfig.answer_selector`: which beam answers

    @classmethod
    def restore(cls, config: Any, step: int | None = None) -> "Inference":
        """The checkpoint of a training run (`train.config.TrainConfig`, the gin-built
        models of that run) without its optimizer state."""
        import seqio

        from atlas_jax import weights
        from atlas_jax.models import fid
        from atlas_jax.train import joint_loss, objectives, state as state_lib
        objective = objectives.ObjectiveConfig()
        train_retriever = objective.objective != "none" and not config.closed_book
        reader = (config.reader_builder or weights.build_reader)()
        retriever = (config.retriever_builder or weights.build_retriever)()
        models = joint_loss.JointModels(fid.FusionInDecoder(reader.config), retriever.model)
        groups = state_lib.param_groups(reader.params, retriever.params, train_retriever,
                                        config.query_side)
        mesh, rules = partitioning.create_mesh(), partitioning.logical_axis_rules()
        state = state_lib.build_state(models, retriever, groups, mesh, rules)
        params, _ = restore_params(config.run_dir / "checkpoints", state, step)
        vocabulary = seqio.get_mixture_or_task(config.task).output_features["targets"].vocabulary
        lengths = config.feature_lengths
        return cls(state.with_params(params), vocabulary, config.query_length,
                   int(lengths["inputs"]), int(lengths["targets"]),
                   config.n_context if not config.closed_book else 1, config.beam_size,
                   config.answer_selector)

    @property
    def params(self) -> dict:
        return self.state.params

    def query_tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Retriever tokens of the queries, (B, query_length) ids and mask."""
        from atlas_jax.train.data import query_tokens
        encodings = self.state.retriever.tokenizer.encode_batch(list(texts))
        return query_tokens([e.ids for e in encodings], self.query_length)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """(B, D) query embeddings with the run's query tower."""
        return embed_fn(self.state, "query")(self.params[self.state.retriever_key],
                                             *self.query_tokens(texts))

    def search(self, index: Any, texts: Sequence[str], k: int, where: Any = None,
               hybrid: bool = False, hybrid_config: Any = None) -> np.ndarray:
        """(B, k) dense passage ids of `index` for the questions `texts` (-1: fewer allowed);
        `where`: (B, N) allowed rows (filters); `hybrid`: BM25 fused with dense."""
        result = index.search(self.embed_queries(texts), k, where=where, query_texts=list(texts),
                              hybrid=hybrid, hybrid_config=hybrid_config)
        return np.asarray(result.ids)

    def generate(self, reader_ids: np.ndarray) -> np.ndarray:
        """Answer tokens (B, target_length) of reader inputs (B, K, L): greedy, or the best
        beam of the run's `TrainConfig.beam_size`."""
        return generate_fn(self.state, self.target_length, self.beam_size)(
            self.params["reader"], reader_ids)

    def generate_beams(self, reader_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All `beam_size` beams of reader inputs (B, K, L): tokens (B, W, target_length) and
        scores (B, W), best first (`generate_fn(all_beams=True)`)."""
        return generate_fn(self.state, self.target_length, self.beam_size, all_beams=True)(
            self.params["reader"], reader_ids)

    def score(self, reader_ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """(B, T) log-likelihood of each target token (teacher-forced)."""
        return score_fn(self.state)(self.params["reader"], reader_ids, targets)

    def decode(self, tokens: Sequence[int]) -> str:
        """The answer text of generated tokens (`decode_answer`)."""
        return decode_answer(self.vocabulary, tokens)
