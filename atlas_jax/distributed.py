"""Multi-host launches (docs/design.md §6): `jax.distributed.initialize` from flags, environment or
gin, and the helpers a loop needs when one mesh spans several processes.

    atlas-jax train --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0 ...

Where the three values come from, first found wins, value by value:
  1. command-line flags (`--coordinator_address`, `--num_processes`, `--process_id`);
  2. `ATLAS_COORDINATOR_ADDRESS`, `ATLAS_NUM_PROCESSES`, `ATLAS_PROCESS_ID`, then jax's own
     `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`;
  3. gin: `DistributedConfig.coordinator_address = '...'` etc.
With none of them and a cluster environment (a SLURM job of several tasks, a Cloud TPU slice
of several workers, an Open MPI launch), `jax.distributed.initialize()` is called without
arguments and detects the cluster itself. Otherwise the run is a single process and nothing
is initialised.

On CPU the processes exchange collectives over gloo (TCP), so several local processes with
simulated devices run the same multi-host code path as a pod (tests/test_multihost.py).

A mesh spanning processes changes three things for the loop:
  - arrays sharded over devices of other processes cannot be read with `np.asarray`:
    `host_array` gathers them (every process gets the whole value);
  - each process builds only its share of a global batch (`local_batch_positions`) and
    `put_batch` assembles the global arrays (`jax.make_array_from_process_local_data`);
  - files shared by the run (metrics, predictions, the index, the operative config) are
    written by process 0 only (`is_primary`), followed by a `barrier` where others read them.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import gin
import numpy as np

ENV_PREFIXES = ("ATLAS_", "JAX_")
FIELDS = ("coordinator_address", "num_processes", "process_id")
# Environment variables that mark a cluster jax can detect by itself, with the variable
# holding the number of processes (None: detection decides).
_CLUSTER_MARKERS = (("SLURM_JOB_ID", "SLURM_NTASKS"), ("TPU_WORKER_HOSTNAMES", None),
                    ("CLOUD_TPU_TASK_ID", None), ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE"))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Gin defaults for the launch (flags and environment variables override them):
    `coordinator_address` "host:port" of process 0, `num_processes`, `process_id` in
    [0, num_processes), `initialization_timeout` seconds to wait for every process."""
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout: int = 300


@dataclasses.dataclass(frozen=True)
class Launch:
    """What `resolve` decided: `mode` is 'single' (nothing to initialise), 'explicit' (the
    three values below) or 'auto' (`jax.distributed.initialize()` detects the cluster)."""
    mode: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)  # field -> where from


def _flag(field: str) -> str:
    return f"--{field}"


def _as_int(value: Any, field: str, source: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = int(value)
        if isinstance(value, float) and number != value:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{source} = {value!r}: {field} must be an integer") from None
    return number


def _cluster_environment(environ: Mapping[str, str]) -> str | None:
    """The marker of a multi-process cluster environment jax detects, or None."""
    for marker, count_variable in _CLUSTER_MARKERS:
        if marker not in environ:
            continue
        if count_variable is not None:
            try:
                if int(environ.get(count_variable, "1")) <= 1:
                    continue
            except ValueError:
                continue
        if marker == "TPU_WORKER_HOSTNAMES" and "," not in environ[marker]:
            continue  # a single-host TPU VM
        return marker
    return None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, environ: Mapping[str, str] | None = None,
            config: DistributedConfig | None = None) -> Launch:
    """Decides how to launch from flags (the arguments), `environ` (default os.environ) and
    gin's DistributedConfig, without touching JAX.

    Raises:
      ValueError: naming the flag, variable or binding at fault (a process id outside
      [0, num_processes), a coordinator address without a port, a missing value).
    """
    environ = os.environ if environ is None else environ
    config = config or DistributedConfig()
    flags = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    values, sources = {}, {}
    for field in FIELDS:
        candidates = [(flags[field], _flag(field))]
        candidates += [(environ.get(prefix + field.upper()), prefix + field.upper())
                       for prefix in ENV_PREFIXES]
        candidates.append((getattr(config, field), f"DistributedConfig.{field}"))
        for value, source in candidates:
            if value is not None and value != "":
                values[field], sources[field] = value, source
                break
    if not values:
        marker = _cluster_environment(environ)
        return Launch("auto", sources={"cluster": marker}) if marker else Launch("single")
    count = (_as_int(values["num_processes"], "num_processes", sources["num_processes"])
             if "num_processes" in values else None)
    pid = (_as_int(values["process_id"], "process_id", sources["process_id"])
           if "process_id" in values else None)
    address = values.get("coordinator_address")
    if count is not None and count < 1:
        raise ValueError(f"{sources['num_processes']} = {count}: num_processes must be >= 1")
    if pid is not None and pid < 0:
        raise ValueError(f"{sources['process_id']} = {pid}: process_id must be >= 0")
    if count is not None and pid is not None and pid >= count:
        raise ValueError(f"{sources['process_id']} = {pid} must be < {sources['num_processes']} "
                         f"= {count} (process ids are 0 .. num_processes - 1)")
    if address is not None and not re.fullmatch(r".+:\d+", str(address)):
        raise ValueError(f"{sources['coordinator_address']} = {address!r}: give host:port "
                         "of process 0 (e.g. 10.0.0.1:1234)")
    if count == 1 and pid in (None, 0):
        return Launch("single", address, 1, 0, sources)
    missing = [field for field, value in zip(FIELDS, (address, count, pid)) if value is None]
    if missing:
        if _cluster_environment(environ):  # jax fills in what is missing
            return Launch("auto", address, count, pid, sources)
        given = ", ".join(f"{sources[f]}" for f in FIELDS if f in sources)
        raise ValueError(f"a multi-process launch needs {', '.join(_flag(f) for f in missing)} "
                         f"(or ATLAS_{missing[0].upper()}) as well as {given}")
    return Launch("explicit", str(address), count, pid, sources)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, environ: Mapping[str, str] | None = None
               ) -> Launch:
    """Resolves the launch (`resolve`) and, unless it is a single process, calls
    `jax.distributed.initialize` (CPU collectives over gloo). Call it before anything else
    touches JAX devices; a second call after a successful one is a no-op.

    Returns:
      the Launch decided.
    Raises:
      ValueError: bad flags, variables or bindings (see `resolve`).
      RuntimeError: JAX was already initialised by the time of the call.
    """
    import jax
    launch = resolve(coordinator_address, num_processes, process_id, environ)
    if launch.mode == "single" or _initialized():
        return launch
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        raise RuntimeError("distributed.initialize must run before JAX is used (devices were "
                           "already created): call it first thing in the program")
    try:  # CPU processes exchange collectives over TCP; older jax names the option differently
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
        pass
    kwargs = {"initialization_timeout": DistributedConfig().initialization_timeout}
    if launch.mode == "explicit" or launch.coordinator_address is not None:
        kwargs.update(coordinator_address=launch.coordinator_address,
                      num_processes=launch.num_processes, process_id=launch.process_id)
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
    return launch


def _initialized() -> bool:
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.client is not None


def is_primary() -> bool:
    """Whether this is process 0, the one that writes the run's shared files."""
    import jax
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches `barrier(name)` (no-op for a single process)."""
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def host_array(array: Any) -> np.ndarray:
    """A jax.Array as numpy on this host: the whole value, gathered from the other processes
    when some of its shards live only there (every process must call it, as a collective)."""
    if getattr(array, "is_fully_addressable", True) or array.is_fully_replicated:
        return np.asarray(array)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def local_batch_positions(mesh: Any, batch_size: int) -> np.ndarray:
    """Positions in a global batch of `batch_size` rows (sharded over 'data' as
    `partitioning.batch_sharding` does) that live on this process's devices, ascending: the
    rows this host builds. All of them for a single process."""
    from atlas_jax import partitioning
    sharding = partitioning.batch_sharding(mesh, 1)
    positions = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        positions.update(range(batch_size)[index[0]])
    return np.array(sorted(positions), np.int64)


def put_batch(mesh: Any, local_batch: dict[str, np.ndarray], batch_size: int
              ) -> dict[str, Any]:
    """Global arrays (leading axis over 'data') of a batch of `batch_size` rows from this
    host's rows (`local_batch_positions`, in that order)."""
    import jax
    from atlas_jax import partitioning
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        out[key] = jax.make_array_from_process_local_data(
            partitioning.batch_sharding(mesh, value.ndim), value,
            (batch_size,) + value.shape[1:])
    return out
