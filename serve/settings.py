"""The app's typed settings: the `args:` of `serve/config.yaml`, validated by Serve
through `build_app`'s annotation. Unknown keys are refused (Serve's own config schema
drops them silently, so a typo there would pass unnoticed)."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Autoscaling(Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class Deployment(Strict):
    """Replicas and resources of one deployment; `autoscaling` replaces `num_replicas`."""

    num_replicas: int = Field(1, ge=1)
    autoscaling: Optional[Autoscaling] = None
    # Logical CPUs: the local defaults fit all replicas on a 2-core machine; a cluster
    # config gives the encoder a GPU instead.
    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(8, ge=1)
    # Requests beyond this wait nowhere: Serve answers 503 (backpressure), never a hang.
    max_queued_requests: int = Field(64, ge=-1)
    # Serve learns that a replica's process died only from its next health check, and then
    # starts a replacement: the period bounds that gap (Serve's default, 10 s, would leave
    # a killed shard unserved ~10 s longer). A check is a 1-row encode or search (the
    # ingress's: its replica answering), cheap at this rate. A check that does not return
    # within the timeout counts as failed, and 3 failures in a row replace the replica (a
    # hung one is gone in ~3 x (period + timeout) + graceful_shutdown_timeout_s).
    health_check_period_s: float = Field(2.0, gt=0)
    health_check_timeout_s: float = Field(5.0, gt=0)
    # On shutdown, redeploy or downscale a replica takes no new requests and is given this
    # long for those it holds (polled every wait_loop_s), then is killed. A shard's or
    # the encoder's requests take milliseconds; the ingress's default is set in ServeSettings.
    graceful_shutdown_wait_loop_s: float = Field(0.5, gt=0)
    graceful_shutdown_timeout_s: float = Field(5.0, ge=0)

    def options(self, name: str) -> dict:
        scale = ({"autoscaling_config": self.autoscaling.model_dump()} if self.autoscaling
                 else {"num_replicas": self.num_replicas})
        return {"name": name, **scale, "max_ongoing_requests": self.max_ongoing_requests,
                "max_queued_requests": self.max_queued_requests,
                "health_check_period_s": self.health_check_period_s,
                "health_check_timeout_s": self.health_check_timeout_s,
                "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
                "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
                "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}


class Batching(Strict):
    max_batch_size: int = Field(8, ge=1)
    # 0: take whatever has queued (a batch still forms under load, while the last one runs);
    # waiting for more only adds latency at low load.
    batch_wait_timeout_s: float = Field(0.0, ge=0)


class LimitSettings(Strict):
    """Request limits (see `cir.serving.inputs.Limits`)."""

    max_k: int = Field(100, ge=1, le=10_000)
    default_k: int = Field(12, ge=1)
    max_text_chars: int = Field(500, ge=1)
    max_upload_mb: float = Field(10.0, gt=0)
    max_pixels: int = Field(25_000_000, ge=1)

    @model_validator(mode="after")
    def _default_k(self):
        if self.default_k > self.max_k:
            raise ValueError(f"default_k {self.default_k} > max_k {self.max_k}")
        return self


STAGES = ("index", "gallery")       # what serving reads of the index job's output


class ServeSettings(Strict):
    # The index job's output folder or URI: its index/ and gallery/ stages (jobs/index.py).
    index: str = "outputs/index-local"
    # The index's shard count; one named deployment serves each shard.
    shards: int = Field(2, ge=1, le=256)
    # A query-encoder spec (baseline:sum, checkpoint:PATH). None: the one the index was
    # built for (a checkpoint, or baseline:sum over the index's open_clip encoder).
    model: Optional[str] = None
    # The open_clip tower of a baseline:... model (None: the index's).
    encoder: Optional[str] = None
    device: Optional[str] = None          # None: cuda when the replica has a GPU
    threads: int = Field(1, ge=1)         # torch threads of an encoder, FAISS threads of a shard
    dedupe_threshold: float = Field(0.95, gt=0, le=1)
    batching: Batching = Batching()
    limits: LimitSettings = LimitSettings()
    # How long the ingress waits for the encoder, and for each shard, before it answers 503
    # instead: a request waits out a short gap (a replica being replaced) and never hangs
    # on a deployment that does not come back.
    request_timeout_s: float = Field(10.0, gt=0)
    query_encoder: Deployment = Deployment(num_cpus=0.5)
    shard: Deployment = Deployment()
    # 32 searches at once: 16 concurrent clients are not an overload (tests/test_serve_load.py).
    # It drains for up to an encoder call and a shard call at their timeouts.
    ingress: Deployment = Deployment(num_cpus=0.25, max_ongoing_requests=32, max_queued_requests=128,
                                     graceful_shutdown_timeout_s=25.0)

    def folders(self):
        """The index/ and gallery/ stages of the index job's output, both committed, in a
        local folder: an index at a URI is copied into this node's cache first, once
        per version (FAISS maps the shard files from a local disk)."""
        from cir.outputs import OutputDir, local_output

        out = OutputDir(self.index)
        for stage in STAGES:
            if not out.done(stage):
                raise FileNotFoundError(f"{out.root} has no finished {stage}/ stage: build it with "
                                        f"`python jobs/index.py --output {self.index}`")
        local = local_output(self.index, list(STAGES))
        return local / "index", local / "gallery"

    def request_limits(self):
        from cir.serving.inputs import Limits as RequestLimits

        lim = self.limits
        return RequestLimits(max_k=lim.max_k, default_k=lim.default_k, max_text_chars=lim.max_text_chars,
                             max_upload_bytes=int(lim.max_upload_mb * 2**20), max_pixels=lim.max_pixels)
