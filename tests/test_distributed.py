"""lcc_jax.distributed.initialize: when it starts jax.distributed, with what, and when it stays out of the way.

No second process is started here: `jax.distributed.initialize` is replaced by a recorder, and the
environment is set with monkeypatch. (A real two-process run is a separate, slower test.)
"""

from __future__ import annotations

import logging

import jax
import pytest

from lcc_jax import distributed
from lcc_jax.distributed import DistributedError, Launch, detect_cluster, initialize, is_primary

CLUSTER_ENV_PREFIXES = ("LCC_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR")


@pytest.fixture
def clean(monkeypatch):
    """No cluster variables, not yet initialised, not a TPU VM; jax.distributed.initialize records its calls."""
    import os

    for name in list(os.environ):
        if name.startswith(CLUSTER_ENV_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setattr(distributed, "_launch", None)
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: False)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    calls: list[dict] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    return calls


def set_env(monkeypatch, **values):
    for name, value in values.items():
        monkeypatch.setenv(name, str(value))


SLURM_4_TASKS = dict(
    SLURM_JOB_ID="4242",
    SLURM_STEP_NODELIST="gpu[001-002]",
    SLURM_NTASKS="4",
    SLURM_PROCID="3",
    SLURM_LOCALID="1",
)


# ----------------------------------------------------------------------------- single process


def test_single_process_without_any_environment_does_nothing(monkeypatch):
    # The real jax.distributed.initialize: it must not be reached (it would fail, the backend is up).
    import os

    for name in list(os.environ):
        if name.startswith(CLUSTER_ENV_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setattr(distributed, "_launch", None)
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: False)
    launch = initialize()
    assert launch == Launch("single", 1, 0)
    assert not launch.multi_process
    assert not jax.distributed.is_initialized()
    assert is_primary()


def test_single_process_logs_what_it_decided(clean, caplog):
    with caplog.at_level(logging.INFO, logger="lcc_jax.distributed"):
        initialize()
    assert "single process" in caplog.text
    assert clean == []


def test_num_processes_one_needs_no_runtime(clean, monkeypatch):
    set_env(monkeypatch, LCC_NUM_PROCESSES=1, LCC_COORDINATOR_ADDRESS="10.0.0.1:1234", LCC_PROCESS_ID=0)
    assert initialize().how == "single"
    assert clean == []


def test_one_task_slurm_allocation_is_a_single_process(clean, monkeypatch):
    set_env(monkeypatch, **{**SLURM_4_TASKS, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert initialize().how == "single"
    assert clean == []


def test_disabled_by_environment_even_under_slurm(clean, monkeypatch):
    set_env(monkeypatch, LCC_DISTRIBUTED="0", **SLURM_4_TASKS)
    assert initialize().how == "disabled"
    assert clean == []


def test_runtime_started_elsewhere_is_left_alone(clean, monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert initialize().how == "already"
    assert clean == []


# ----------------------------------------------------------------------------- GPU clusters from the environment


def test_lcc_environment_variables_are_passed_to_jax(clean, monkeypatch):
    set_env(
        monkeypatch,
        LCC_COORDINATOR_ADDRESS="10.0.0.1:1234",
        LCC_NUM_PROCESSES="4",
        LCC_PROCESS_ID="2",
        LCC_LOCAL_DEVICE_IDS="0, 1",
    )
    launch = initialize()
    assert clean == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2, local_device_ids=[0, 1])]
    assert launch == Launch("explicit", 4, 2, "10.0.0.1:1234")
    assert launch.multi_process


def test_arguments_win_over_environment_variables(clean, monkeypatch):
    set_env(monkeypatch, LCC_COORDINATOR_ADDRESS="10.0.0.1:1234", LCC_NUM_PROCESSES="4", LCC_PROCESS_ID="2")
    initialize(coordinator_address="node7:999", process_id=0)
    assert clean == [dict(coordinator_address="node7:999", num_processes=4, process_id=0)]


def test_second_call_is_a_no_op(clean, monkeypatch):
    set_env(monkeypatch, LCC_COORDINATOR_ADDRESS="10.0.0.1:1234", LCC_NUM_PROCESSES="2", LCC_PROCESS_ID="1")
    first = initialize()
    second = initialize(num_processes=8)
    assert second is first
    assert len(clean) == 1


def test_slurm_with_several_tasks_lets_jax_read_the_scheduler(clean, monkeypatch):
    set_env(monkeypatch, **SLURM_4_TASKS)
    assert detect_cluster() == "slurm"
    launch = initialize()
    assert clean == [{}]  # jax's SLURM detection fills in coordinator, count and id
    assert launch.how == "slurm"


def test_slurm_with_an_explicit_coordinator_passes_only_that(clean, monkeypatch):
    set_env(monkeypatch, LCC_COORDINATOR_ADDRESS="gpu001:5555", **SLURM_4_TASKS)
    initialize()
    assert clean == [dict(coordinator_address="gpu001:5555")]


def test_open_mpi_with_several_ranks_is_detected(clean, monkeypatch):
    set_env(monkeypatch, OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="0")
    assert initialize().how == "openmpi"
    assert clean == [{}]


# ----------------------------------------------------------------------------- TPU


def test_multi_host_tpu_is_initialised_automatically(clean, monkeypatch):
    set_env(monkeypatch, TPU_WORKER_HOSTNAMES="t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3", TPU_WORKER_ID="1")
    assert initialize().how == "tpu"
    assert clean == [{}]


def test_multislice_tpu_is_initialised_automatically(clean, monkeypatch):
    set_env(monkeypatch, MEGASCALE_NUM_SLICES="2", MEGASCALE_COORDINATOR_ADDRESS="10.1.0.2")
    assert detect_cluster() == "tpu"


def test_single_host_tpu_worker_list_is_a_single_process(clean, monkeypatch):
    set_env(monkeypatch, TPU_WORKER_HOSTNAMES="localhost", TPU_WORKER_ID="0")
    assert detect_cluster() is None
    assert initialize().how == "single"
    assert clean == []


def test_tpu_vm_without_hints_asks_jax_and_falls_back_to_one_process(clean, monkeypatch):
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: True)
    tried = []

    def no_cluster(**kwargs):
        tried.append(kwargs)
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    assert initialize() == Launch("single", 1, 0)
    assert tried == [{}]


def test_tpu_vm_whose_metadata_names_a_pod_is_initialised(clean, monkeypatch):
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: True)
    assert initialize().how == "tpu"
    assert clean == [{}]


# ----------------------------------------------------------------------------- refusals


def test_non_integer_process_count_is_named(clean, monkeypatch):
    set_env(monkeypatch, LCC_NUM_PROCESSES="four")
    with pytest.raises(DistributedError, match="LCC_NUM_PROCESSES='four' is not an integer"):
        initialize()


def test_negative_process_id_is_refused(clean, monkeypatch):
    set_env(monkeypatch, LCC_PROCESS_ID="-1")
    with pytest.raises(DistributedError, match="LCC_PROCESS_ID=-1 must be at least 0"):
        initialize()


def test_incomplete_setup_names_what_is_missing(clean, monkeypatch):
    set_env(monkeypatch, LCC_COORDINATOR_ADDRESS="10.0.0.1:1234")
    with pytest.raises(DistributedError, match="but not num_processes, process_id"):
        initialize()
    assert clean == []


def test_coordinator_without_a_port_is_refused(clean):
    with pytest.raises(DistributedError, match="must be 'host:port'"):
        initialize(coordinator_address="10.0.0.1", num_processes=2, process_id=0)


def test_process_id_beyond_the_process_count_is_refused(clean):
    with pytest.raises(DistributedError, match=r"process_id 2 is outside 0\.\.1"):
        initialize(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=2)


def test_bad_local_device_ids_are_named(clean, monkeypatch):
    set_env(monkeypatch, LCC_LOCAL_DEVICE_IDS="gpu0,gpu1")
    with pytest.raises(DistributedError, match="LCC_LOCAL_DEVICE_IDS='gpu0,gpu1' must be comma-separated integers"):
        initialize()


def test_too_late_initialisation_says_to_call_it_first(clean, monkeypatch):
    def too_late(**kwargs):
        raise RuntimeError("jax.distributed.initialize() must be called before any JAX computations are executed.")

    monkeypatch.setattr(jax.distributed, "initialize", too_late)
    with pytest.raises(DistributedError, match="before any other JAX call"):
        initialize(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=0)
    assert distributed._launch is None  # a failed attempt is not remembered as done


# ----------------------------------------------------------------------------- primary process


def test_only_process_zero_is_primary(monkeypatch):
    assert is_primary()
    monkeypatch.setattr(jax, "process_index", lambda: 3)
    assert not is_primary()
