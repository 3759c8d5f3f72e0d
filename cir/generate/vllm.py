"""The `vllm` backend: vLLM on GPUs inside Ray Data (`ray.data.llm`).

Choose it on a GPU cluster for throughput: each of `generate.num_actors` replicas is a
vLLM engine (continuous batching, paged KV cache) serving a 7-8B instruct model named
by `generate.vllm.model_source` (a hub id, or a local / s3:// model folder). Ray Data
applies the chat template, tokenises and detokenises in CPU stages around the engine.
Elsewhere use `hf` (Hugging Face `generate`, CPU or GPU) or `http` (a vLLM or Ray Serve
LLM server that is already running).

It refuses, once Ray is up and before anything is written (`check_cluster`):
* a cluster without (enough, or the named type of) GPUs: Ray Data would wait for them
  forever, saying nothing. On an autoscaling cluster `gpu_wait_s` asks the autoscaler
  for them and waits that long first;
* GPU nodes without vLLM: the engine actors would fail one by one, after the earlier
  stages had run. The driver itself may be a CPU head node without vLLM, so the check
  runs on the GPU nodes.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

from cir.generate.llm import ChatTask, LLMBackend

PROBE_TIMEOUT_S = 120.0   # a fresh worker, plus a runtime_env to set up, on each GPU node
POLL_S = 5.0
ALTERNATIVES = ("use `generate.backend: hf` (Hugging Face generate, runs on CPU or GPU) or "
                "`generate.backend: http` (an OpenAI-compatible vLLM or Ray Serve LLM server that is running)")


@dataclass
class VLLMOptions:
    """`generate.vllm`."""

    model_source: str = ""       # hub id or model folder (local, shared or s3://)
    engine_kwargs: dict = field(default_factory=dict)   # vLLM engine args: max_model_len, tensor_parallel_size...
    accelerator_type: str | None = None                 # e.g. "H100": only such nodes run the engine
    gpu_wait_s: float = 0.0      # autoscaling cluster: wait this long for GPU nodes; 0: refuse at once
    max_concurrent_batches: int = 8                     # batches in flight per engine (Ray's default)
    runtime_env: dict | None = None                     # for the engine actors, e.g. {"pip": ["vllm==0.29.0"]}


class ChatRequest:
    """Processor preprocess: a pair row -> the chat messages and sampling parameters."""

    def __init__(self, task: ChatTask, sampling: dict):
        self.task, self.sampling = task, sampling

    def __call__(self, row: dict) -> dict:
        return {"messages": self.task.messages(row["ref_caption"], row["tgt_caption"]),
                "sampling_params": dict(self.sampling)}


class ChatAnswer:
    """Processor postprocess: keep the `carry` columns, add the answer and its token count."""

    def __init__(self, output: str, carry: list[str]):
        self.output, self.carry = output, carry

    def __call__(self, row: dict) -> dict:
        out = {name: row[name] for name in self.carry}
        out[self.output] = (row.get("generated_text") or "").strip()
        out[self.output + "_tokens"] = int(row.get("num_generated_tokens") or 0)
        return out


class VLLMBackend(LLMBackend):
    name = "vllm"

    @property
    def model_id(self) -> str:
        # A folder or URI is named by its last component; a hub id stays whole, as in `hf`.
        source = self.options.model_source.rstrip("/")
        if "://" in source or source.startswith(("/", ".", "~")):
            return source.rsplit("/", 1)[-1]
        return source

    def validate_engine(self) -> None:
        # No vLLM import check here: the driver may well be a CPU node without it.
        o = self.options
        if not o.model_source.strip():
            raise ValueError("generate.vllm.model_source is empty: name the model, a hub id such as "
                             "Qwen/Qwen2.5-7B-Instruct or a model folder")
        if not isinstance(o.engine_kwargs, dict):
            raise ValueError(f"generate.vllm.engine_kwargs must be a mapping, got {o.engine_kwargs!r}")
        if o.gpu_wait_s < 0:
            raise ValueError(f"generate.vllm.gpu_wait_s must be >= 0, got {o.gpu_wait_s}")
        if o.max_concurrent_batches < 1:
            raise ValueError(f"generate.vllm.max_concurrent_batches must be >= 1, got {o.max_concurrent_batches}")
        if o.accelerator_type is not None and not o.accelerator_type.strip():
            raise ValueError("generate.vllm.accelerator_type is empty: give a type such as H100, or leave it unset")
        try:
            self.processor_config()   # Ray's own field checks, before any work
        except ValueError as e:
            raise ValueError(f"generate.vllm: Ray's vLLMEngineProcessorConfig refuses these options: {e}") from e

    def fingerprint(self) -> dict:
        fp = super().fingerprint()
        # The model and its engine settings change the texts; waiting and placement do not.
        fp["options"] = {"model_source": self.options.model_source, "engine_kwargs": self.options.engine_kwargs}
        return fp

    def gpus_per_replica(self) -> int:
        kw = self.options.engine_kwargs
        return int(kw.get("tensor_parallel_size", 1)) * int(kw.get("pipeline_parallel_size", 1))

    def processor_config(self, **stages):
        """Ray's processor config; `stages`: more stage settings (e.g. the captions
        step's `prepare_multimodal_stage`)."""
        from ray.data.llm import vLLMEngineProcessorConfig

        o = self.options
        return vLLMEngineProcessorConfig(
            model_source=o.model_source,
            engine_kwargs=copy.deepcopy(o.engine_kwargs),   # Ray adds keys to the dict it is given
            batch_size=self.batch_size, concurrency=self.num_actors,
            accelerator_type=o.accelerator_type, runtime_env=o.runtime_env,
            max_concurrent_batches=o.max_concurrent_batches,
            chat_template_stage=True, tokenize_stage=True, detokenize_stage=True, **stages)

    def sampling(self, task: ChatTask) -> dict:
        t = self.task
        return {"max_tokens": task.max_new_tokens, "temperature": t.temperature, "top_p": t.top_p, "seed": t.seed}

    def generate(self, ds, task: ChatTask, carry: list[str]):
        from ray.data.llm import build_processor

        # (Rows cross the processor as Python dicts; PairTexts restores their Arrow types.)
        processor = build_processor(self.processor_config(), preprocess=ChatRequest(task, self.sampling(task)),
                                    postprocess=ChatAnswer(task.output, carry))
        return processor(ds)

    # -- cluster checks ---------------------------------------------------------
    def gpu_nodes(self) -> list[dict]:
        """The alive nodes with GPUs (of `accelerator_type`, when set)."""
        import ray

        accel = self.options.accelerator_type
        return [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0
                and (not accel or f"accelerator_type:{accel}" in n["Resources"])]

    def check_cluster(self) -> None:
        need, o = self.gpus_per_replica(), self.options
        nodes = self.gpu_nodes()
        if _gpus(nodes) < need and o.gpu_wait_s > 0:
            nodes = self._wait_for_gpus(need)
        if _gpus(nodes) < need:
            kind = f"{o.accelerator_type} GPUs" if o.accelerator_type else "GPUs"
            has = f"only {_gpus(nodes):g} {kind}" if nodes else f"no {kind}"
            wait = (f" after waiting {o.gpu_wait_s:g}s for the autoscaler" if o.gpu_wait_s > 0 else
                    " (on an autoscaling cluster, set generate.vllm.gpu_wait_s to let GPU nodes start)")
            raise ValueError(f"generate.backend 'vllm' needs {need} {kind} per replica, and this Ray cluster has "
                             f"{has}{wait}; a vLLM processor would wait for them forever. "
                             f"Run on a GPU cluster, or {ALTERNATIVES}.")
        self._check_vllm_installed(nodes)

    def _wait_for_gpus(self, need: int) -> list[dict]:
        from cir.progress import log

        o = self.options
        bundle = {"GPU": 1} | ({f"accelerator_type:{o.accelerator_type}": 0.001} if o.accelerator_type else {})
        requested = _request_resources([bundle] * need)
        log(f"vllm: waiting up to {o.gpu_wait_s:g}s for {need} GPU(s)")
        deadline = time.monotonic() + o.gpu_wait_s
        try:
            nodes = self.gpu_nodes()
            while _gpus(nodes) < need and time.monotonic() < deadline:
                time.sleep(max(0.0, min(POLL_S, deadline - time.monotonic())))
                nodes = self.gpu_nodes()
            return nodes
        finally:
            if requested:
                # The request persists; the engine actors ask for their GPUs themselves.
                _request_resources([])

    def _check_vllm_installed(self, nodes: list[dict]) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        def has_vllm() -> bool:
            import importlib.util

            return importlib.util.find_spec("vllm") is not None

        probe = ray.remote(num_cpus=0)(has_vllm)
        refs = [probe.options(runtime_env=self.options.runtime_env,
                              scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                for n in nodes]
        try:
            found = ray.get(refs, timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.RayError as e:   # GetTimeoutError included
            for ref in refs:
                ray.cancel(ref, force=True)
            raise ValueError(f"could not check for vLLM on the GPU nodes ({type(e).__name__}: {e}); "
                             f"check generate.vllm.runtime_env and the nodes, or {ALTERNATIVES}") from e
        missing = [n["NodeManagerAddress"] for n, ok in zip(nodes, found) if not ok]
        if missing:
            raise ValueError(
                f"vLLM is not installed on GPU node(s) {', '.join(missing)}: put it in the GPU nodes' image "
                "(pip install 'cir[gpu]', the pyproject `gpu` extra; Ray 2.60's `ray[llm]` pins vllm 0.29.0) "
                f"or set generate.vllm.runtime_env, e.g. {{pip: [vllm==0.29.0]}}; or {ALTERNATIVES}.")


def _gpus(nodes: list[dict]) -> float:
    return sum(n["Resources"].get("GPU", 0) for n in nodes)


def _request_resources(bundles: list[dict]) -> bool:
    """Ask the autoscaler for `bundles` ([] clears the request); False where there is none."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
        return True
    except Exception:     # a local cluster has no autoscaler; waiting then just polls
        return False
