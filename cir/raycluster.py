"""Joining or starting Ray the same way from every job."""
from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs):
    """Join the cluster in `address` / RAY_ADDRESS (as under `ray job submit`), or
    start a private local one. `address="local"` avoids attaching to a stale
    cluster-address file left by an earlier `ray start`."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, **kwargs)
    else:
        # A private local cluster has no other users: token auth only gets in the way.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    return ray


def gpus_per_actor(setting) -> float:
    """GPUs per Ray Data actor from a `gpus_per_actor` setting: a number, or "auto"
    (1 when the running cluster has GPUs, else 0)."""
    import ray

    if setting == "auto":
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return float(setting)


def dataset_from_table(table, rows_per_block: int):
    """A Ray Dataset over an in-memory Arrow table, cut into blocks of `rows_per_block`
    rows so that an actor pool (or the training workers) can share the work."""
    import ray

    step = max(1, int(rows_per_block))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)])
