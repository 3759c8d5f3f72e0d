"""The Ray Data actor pools of the synth and index jobs, and what they do when an actor dies.

Every `map_batches` over a pool of model-holding actors (the encoder, the text
generators, the quality filter, the captioners, the thumbnailer) takes its pool and
fault settings from `actor_pool(size, ...)`:

* `max_restarts=-1`: an actor whose process dies (SIGKILL, the OOM killer, a segfault,
  a lost node) is restarted, rebuilding its model in its constructor, as often as that
  happens. This is Ray Data 2.60's own default, pinned here because the pool relies on
  it: it never replaces an actor that is dead for good, so a finite number would leave
  a long job on preemptible nodes with one actor fewer after each exhausted one.
* `max_task_retries=ACTOR_TASK_RETRIES`: the block an actor was working on (and those
  queued on it) is redone from its start on the restarted actor: no row is lost, and
  none is written twice (a block's output is emitted once). Ray Data's default is -1,
  retry forever: a block that kills its actor every time (an image that crashes a
  decoder, a batch that runs a node out of memory) would restart the model for ever
  and the job would never end. Bounded, the stage fails after that many tries of one
  block (`explain_actor_deaths` says so in words; Ray's error names only the actor).

Application errors (a Python exception in the model code) are not retried: Ray Data's
default, kept, since they repeat on every try. Plain tasks (Parquet reads and writes,
filters) keep Ray Data's default of unlimited retries after a worker's death: they run
no model code, so what kills them is a lost node, not their input.

Ray 2.60 takes these two settings only through `map_batches(**ray_remote_args)`, which
it deprecates for named parameters (none of them is one) and plans to drop in 2.64:
this module is the one place to change then.
"""
from __future__ import annotations

import contextlib

# Tries of one block = 1 + this. A retry costs the actor's model load (seconds for the
# CPU encoders, minutes for a 7B LLM on a GPU), so a crash loop stops after 4 loads.
ACTOR_TASK_RETRIES = 3


def actor_pool(size: int, **ray_remote_args) -> dict:
    """`map_batches` keyword arguments: a fixed pool of `size` actors with the fault
    settings above, and `ray_remote_args` (num_cpus, num_gpus, ...)."""
    import ray

    return {"compute": ray.data.ActorPoolStrategy(size=size), "max_restarts": -1,
            "max_task_retries": ACTOR_TASK_RETRIES, **ray_remote_args}


class ActorCrashLoop(RuntimeError):
    """A block whose every try killed the actor working on it."""


@contextlib.contextmanager
def explain_actor_deaths(stage: str):
    """Re-raise Ray's error for an actor that died on each try of a block as one that
    says what happened (an exception in an actor's constructor passes unchanged)."""
    import ray

    try:
        yield
    except ray.exceptions.RayActorError as exc:
        if exc.actor_init_failed:
            raise
        raise ActorCrashLoop(
            f"{stage}: a Ray Data actor died on each of the {ACTOR_TASK_RETRIES + 1} tries of one block: "
            "killed by the OOM killer, a crash (segfault) in the model or an image decoder, or its node "
            f"lost; the worker logs are in the Ray session's logs folder. Ray: {exc}") from exc
