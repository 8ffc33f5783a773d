"""The jointly trained models on a device mesh: models, parameters placed on the mesh and
their shardings. Training (`trainer`), `atlas-jax plan` and inference (`atlas_jax.inference`)
build it the same way; the jit functions of `steps` take it (docs/design.md §1, §3)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from atlas_jax import partitioning
from atlas_jax.train import joint_loss


@dataclasses.dataclass(frozen=True)
class ModelState:
    """Models + parameters on `mesh`. `params` groups: "reader"; "retriever" (trained) or
    "frozen_retriever"; "frozen_passage_tower" (query-side training). `compiled` caches the
    jit functions built for it (`steps`), shared by the states `with_params` derives."""
    models: joint_loss.JointModels
    retriever: Any                    # weights.Retriever: config and tokenizer
    params: dict
    param_shardings: dict
    mesh: Any
    rules: Any
    compiled: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def retriever_key(self) -> str:
        return "retriever" if "retriever" in self.params else "frozen_retriever"

    def passage_params(self, params: dict) -> Any:
        """The passage tower the index and the retriever loss use."""
        return params.get("frozen_passage_tower", params[self.retriever_key])

    def with_params(self, params: dict) -> "ModelState":
        """The same models and compiled functions with other parameters (same groups)."""
        return dataclasses.replace(self, params=params, compiled=self.compiled)


def param_groups(reader_params: Any, retriever_params: Any, train_retriever: bool,
                 query_side: bool) -> dict:
    """The parameter groups of a run (see `ModelState`)."""
    params = {"reader": reader_params,
              "retriever" if train_retriever else "frozen_retriever": retriever_params}
    if query_side and train_retriever:
        # Its own arrays: the train step donates the trained tower, never the frozen copy.
        params["frozen_passage_tower"] = jax.tree.map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jnp.array(x),
            retriever_params)
    return params


def param_shardings(params: dict, models: joint_loss.JointModels, mesh, rules) -> dict:
    """Each group's NamedShardings from the models' logical axis annotations."""
    ones3, ones2 = jnp.ones((1, 1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)
    reader = partitioning.param_shardings(
        lambda r: models.reader.init(r, ones3, jnp.ones((1, 2), jnp.int32)), mesh, rules)
    retriever = partitioning.param_shardings(
        lambda r: models.retriever.init(r, ones2, ones2, ones2, ones2), mesh, rules)
    return {key: reader if key == "reader" else retriever for key in params}


def abstract_params(models: joint_loss.JointModels) -> tuple[Any, Any]:
    """(reader, retriever) parameters as ShapeDtypeStructs (nothing allocated)."""
    ones3, ones2 = jnp.ones((1, 1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)
    reader, _ = partitioning.abstract_params(
        lambda r: models.reader.init(r, ones3, jnp.ones((1, 2), jnp.int32)))
    retriever, _ = partitioning.abstract_params(
        lambda r: models.retriever.init(r, ones2, ones2, ones2, ones2))
    return reader, retriever


def build_state(models: joint_loss.JointModels, retriever: Any, params: dict, mesh, rules,
                abstract: bool = False) -> ModelState:
    """Places `params` (host or device trees, groups as in `param_groups`) on the mesh; with
    `abstract`, keeps them as ShapeDtypeStructs carrying their shardings (`plan`)."""
    shardings = param_shardings(params, models, mesh, rules)
    if abstract:
        placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              params, shardings)
    else:
        placed = partitioning.shard_params(params, shardings)
    return ModelState(models, retriever, placed, shardings, mesh, rules)
