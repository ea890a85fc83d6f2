"""Start JAX's multi-process runtime when, and only when, there is more than one process.

Call `initialize()` first thing in a script (before any JAX computation). It decides, in order:

1. already done (by us or by a direct `jax.distributed.initialize`): nothing to do;
2. `LCC_DISTRIBUTED=0`: stay single-process whatever the environment says;
3. explicit arguments, else `LCC_COORDINATOR_ADDRESS` / `LCC_NUM_PROCESSES` / `LCC_PROCESS_ID`
   (and optionally `LCC_LOCAL_DEVICE_IDS="0,1"`): a GPU cluster without a scheduler JAX knows;
4. a scheduler JAX detects by itself: SLURM (`srun` with more than one task), Open MPI
   (`mpirun -n N`, N > 1), multi-host Cloud TPU (GKE worker list, Megascale); JAX reads the rest;
5. a Cloud TPU VM without those hints: ask JAX to read the TPU metadata; one host means one process;
6. otherwise: one process, nothing to do.

`is_primary()` tells the one process that should write files and print summaries.

Multi-process helpers (each a no-op, or plain NumPy, on one process):

* every process builds the same host batches (same data, same seed) and `to_global` places them on
  a mesh of all processes' devices: each process transfers only the rows of its own devices;
* `gather_to_host` brings arrays sharded over several processes back to NumPy on every process
  (a collective: all processes must call it, in the same order);
* `barrier` waits for all processes (e.g. after process 0 wrote a file the others will read);
* `broadcast` hands process 0's value (a small integer array) to everyone, e.g. a temp-folder name;
* `all_true` is True only when a flag holds on every process (e.g. "I can see the shared folder").
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from lcc_jax.errors import UserError

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "LCC_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "LCC_NUM_PROCESSES"
ENV_PROCESS_ID = "LCC_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "LCC_LOCAL_DEVICE_IDS"
ENV_DISABLE = "LCC_DISTRIBUTED"


class DistributedError(UserError):
    """A multi-process set-up that is incomplete or contradicts itself."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """What `initialize` did: `how` is 'single', 'disabled', 'explicit', 'slurm', 'openmpi', 'tpu' or 'already'."""

    how: str
    num_processes: int
    process_id: int
    coordinator_address: str | None = None

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


_launch: Launch | None = None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | int | None = None,
) -> Launch:
    """Initialise `jax.distributed` if this is one process of several; idempotent; returns what it did."""
    global _launch
    if _launch is not None:
        logger.debug("lcc_jax.distributed.initialize: already done (%s)", _launch)
        return _launch
    if jax.distributed.is_initialized():
        _launch = Launch("already", jax.process_count(), jax.process_index())
        logger.info("jax.distributed already initialised: process %d of %d", _launch.process_id, _launch.num_processes)
        return _launch

    env = os.environ
    if env.get(ENV_DISABLE, "").strip().lower() in ("0", "false", "no", "off"):
        _launch = Launch("disabled", 1, 0)
        logger.info("%s=%s: running as a single process", ENV_DISABLE, env[ENV_DISABLE])
        return _launch

    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(env, ENV_NUM_PROCESSES, minimum=1)
    process_id = process_id if process_id is not None else _env_int(env, ENV_PROCESS_ID, minimum=0)
    if local_device_ids is None and env.get(ENV_LOCAL_DEVICE_IDS):
        local_device_ids = _env_int_list(env, ENV_LOCAL_DEVICE_IDS)

    if num_processes == 1:
        _launch = Launch("single", 1, 0)
        logger.info("one process (num_processes=1): jax.distributed not needed")
        return _launch

    cluster = detect_cluster(env)
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if all(v is not None for v in given.values()):
        _check_explicit(coordinator_address, num_processes, process_id)
        how = "explicit"
    elif cluster is not None:
        how = cluster  # JAX fills in whatever was not given from the scheduler's environment
    elif any(v is not None for v in given.values()):
        missing = [name for name, v in given.items() if v is None]
        raise DistributedError(
            f"incomplete multi-process set-up: got {', '.join(k for k, v in given.items() if v is not None)} but not "
            f"{', '.join(missing)}, and no SLURM / Open MPI / TPU environment to fill them in. Pass all three or set "
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}."
        )
    elif on_cloud_tpu_vm():
        how = "tpu-metadata"
    else:
        _launch = Launch("single", 1, 0)
        logger.info("no multi-process environment found: running as a single process")
        return _launch

    kwargs = {k: v for k, v in given.items() if v is not None}
    if local_device_ids is not None:
        kwargs["local_device_ids"] = local_device_ids
    logger.info("initialising jax.distributed (%s) with %s", how, kwargs or "settings detected by JAX")
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:
        if how != "tpu-metadata":
            raise
        # A TPU VM whose metadata names no cluster: a single host.
        logger.info("TPU VM without a multi-host cluster (%s): running as a single process", e)
        _launch = Launch("single", 1, 0)
        return _launch
    except RuntimeError as e:
        raise DistributedError(
            f"jax.distributed.initialize failed ({e}). Call lcc_jax.distributed.initialize() before any other "
            "JAX call: it must run before the backend starts."
        ) from e
    _launch = Launch(
        "tpu" if how == "tpu-metadata" else how,
        num_processes if num_processes is not None else jax.process_count(),
        process_id if process_id is not None else jax.process_index(),
        coordinator_address,
    )
    logger.info(
        "jax.distributed ready (%s): process %d of %d, %d local / %d global devices",
        _launch.how,
        _launch.process_id,
        _launch.num_processes,
        jax.local_device_count(),
        jax.device_count(),
    )
    return _launch


def is_primary() -> bool:
    """True on the one process that should write files and print summaries (process 0)."""
    return jax.process_index() == 0


def multi_process() -> bool:
    """True when this is one JAX process of several."""
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op on one process)."""
    if multi_process():
        multihost_utils.sync_global_devices(name)


def broadcast(value):
    """Process 0's `value` (a pytree of small NumPy arrays or numbers) on every process."""
    if not multi_process():
        return value

    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(value))


def all_true(flag: bool) -> bool:
    """True when `flag` is True on every process (a collective: every process must call it)."""
    if not multi_process():
        return bool(flag)

    return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(flag), np.int32))))


def to_global(tree, sharding):
    """Host arrays that are identical on every process -> global arrays placed with `sharding`.

    Each process copies only the slices its own devices hold, so a batch split over the mesh's
    data axes is split over the processes too. Unlike `jax.device_put`, which all-gathers a host
    array across processes to check that it is the same everywhere, this runs no collective, so it
    is cheap and safe from a prefetch thread while the main thread runs collectives. One process,
    or a sharding within this process: `jax.device_put`.
    """
    if sharding is None or not multi_process() or sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def place(x):
        if isinstance(x, jax.Array):
            return jax.device_put(x, sharding)  # already on devices: no host check involved
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(place, tree)


def gather_to_host(tree):
    """NumPy copies of every array leaf of `tree`, whole, on every process.

    Arrays with shards on other processes are all-gathered (a collective: every process must call
    this for the same arrays, in the same order); local and fully replicated ones are only fetched.
    """

    def fetch(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(fetch, tree)


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
    """The multi-process scheduler JAX can read its settings from: 'slurm', 'openmpi', 'tpu' or None.

    Only launches of more than one process count: a one-task SLURM allocation is a single process.
    """
    env = os.environ if env is None else env
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and _int_or(env["SLURM_NTASKS"], 1) > 1:
        return "slurm"
    if _int_or(env.get("OMPI_COMM_WORLD_SIZE"), 1) > 1:
        return "openmpi"
    workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([w for w in workers.split(",") if w.strip()]) > 1 or _int_or(env.get("MEGASCALE_NUM_SLICES"), 1) > 1:
        return "tpu"
    return None


def on_cloud_tpu_vm() -> bool:
    """libtpu is installed and TPU chips are attached (what JAX itself checks, without starting a backend)."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _check_explicit(coordinator_address: str, num_processes: int, process_id: int) -> None:
    host, sep, port = coordinator_address.rpartition(":")
    if not (sep and host and port.isdigit()):
        raise DistributedError(
            f"coordinator address {coordinator_address!r} must be 'host:port', e.g. '10.0.0.1:1234'."
        )
    if not 0 <= process_id < num_processes:
        raise DistributedError(
            f"process_id {process_id} is outside 0..{num_processes - 1} (num_processes={num_processes})."
        )


def _env_int(env: Mapping[str, str], name: str, minimum: int) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise DistributedError(f"{name}={text!r} is not an integer.") from None
    if value < minimum:
        raise DistributedError(f"{name}={value} must be at least {minimum}.")
    return value


def _env_int_list(env: Mapping[str, str], name: str) -> list[int]:
    try:
        return [int(part) for part in env[name].split(",") if part.strip()]
    except ValueError:
        raise DistributedError(f"{name}={env[name]!r} must be comma-separated integers, e.g. '0,1,2,3'.") from None


def _int_or(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default
