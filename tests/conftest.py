"""Shared fixtures: one local Ray per test session (ray.init costs ~6 s and ~1 GB)."""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = REPO.parent / "shared" / "benchmarks"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="cir-ray-"))


def load_job(name: str):
    """The module of `jobs/NAME.py` (jobs are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=512 * 1024**2,
                 include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A save_pretrained folder of a tiny chat model with known answers (tests/tiny_llm.py)."""
    from tiny_llm import build_tiny_chat_model

    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"))
