"""One optimisation step behind one interface: DeepSpeed (ZeRO, mixed precision) or
plain DDP when DeepSpeed is switched off, plus their checkpoints.

DeepSpeed is imported only here and only when enabled; on CPU it runs with its CPU
accelerator and gloo. Its checkpoints are its own files (written and read back by
this run only); the model handed to users is exported separately as safetensors.
The DDP fallback checkpoints through safetensors (model, AdamW moments) + JSON.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

import torch

from cir.optim import warmup_cosine

DS_TAG = "state"


def deepspeed_config(micro: int, accum: int, world: int, zero_stage: int, precision: str,
                     grad_clip: float) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "gradient_clipping": grad_clip,
        # A torch optimizer avoids compiling DeepSpeed's fused CPU Adam (~60 s).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def require_deepspeed():
    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError("deepspeed is not installed: `pip install deepspeed`, or set "
                          "deepspeed.enabled: false to train with plain DDP") from exc
    if cpu:
        skip_shared_memory_all_reduce(deepspeed)
    return deepspeed


def skip_shared_memory_all_reduce(deepspeed) -> None:
    """On its CPU accelerator DeepSpeed's comm backend JIT-compiles a shared-memory
    all-reduce op as it starts (~30 s of C++ on 2 cores, per machine, and again whenever
    another process built it with other flags: a Ray job's workers do). Only inference
    all-reduce calls it; training all-reduces through torch.distributed (gloo)."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


class Engine:
    """Forward + backward + (at accumulation boundaries) optimizer step."""

    def __init__(self, model, stage, ds_settings, world: int, total_steps: int, device):
        o = stage.optim
        self.accum = o.grad_accum
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(warmup_cosine, warmup=o.warmup_steps, total=total_steps))
        self.deepspeed = ds_settings.enabled
        self.micro_steps = 0
        if self.deepspeed:
            ds = require_deepspeed()
            config = deepspeed_config(o.micro_batch_size, o.grad_accum, world, ds_settings.zero_stage,
                                      ds_settings.precision, o.grad_clip)
            self.engine, self.optimizer, _, self.scheduler = ds.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
                dist_init_required=False)
            self.module = self.engine.module
        else:
            import ray.train.torch

            self.module = model
            self.engine = ray.train.torch.prepare_model(
                model, parallel_strategy_kwargs={"find_unused_parameters": True}) if world > 1 else model.to(device)
            self.optimizer, self.scheduler, self.grad_clip = optimizer, scheduler, o.grad_clip
            self.steps = 0

    def train_micro_batch(self, batch: dict) -> dict:
        """Returns the forward's outputs; steps the optimizer every `accum` calls."""
        self.micro_steps += 1
        if self.deepspeed:
            out = self.engine(batch)
            self.engine.backward(out["loss"])
            self.engine.step()
            return out
        boundary = self.micro_steps % self.accum == 0
        ctx = self.engine.no_sync() if (not boundary and hasattr(self.engine, "no_sync")) else contextlib.nullcontext()
        with ctx:
            out = self.engine(batch)
            (out["loss"] / self.accum).backward()
        if boundary:
            torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], self.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.steps += 1
        return out

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- checkpoints: every rank calls these (ZeRO shards optimizer state by rank) --
    def save(self, folder: Path, state: dict, rank: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if self.deepspeed:
            self.engine.save_checkpoint(str(folder), tag=DS_TAG, client_state={}, save_latest=False)
        elif rank == 0:
            _save_plain(folder, self.module, self.optimizer, self.scheduler, self.steps)
        if rank == 0:
            (folder / "train_state.json").write_text(json.dumps(state, indent=2))

    def load(self, folder: Path) -> dict:
        state = json.loads((folder / "train_state.json").read_text())
        if self.deepspeed:
            self.engine.load_checkpoint(str(folder), tag=DS_TAG, load_module_strict=True)
        else:
            self.steps = _load_plain(folder, self.module, self.optimizer, self.scheduler)
        return state


def _save_plain(folder: Path, module, optimizer, scheduler, steps: int) -> None:
    from safetensors.torch import save_file

    names = {id(p): n for n, p in module.named_parameters()}
    # Cloned: tied weights (an LM's input and output embeddings) share memory, which
    # safetensors refuses to save.
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"optim.{names[id(p)]}.{key}"] = value.detach().reshape(-1).contiguous() \
                        if value.ndim == 0 else value.detach().contiguous()
    save_file(tensors, str(folder / "plain_state.safetensors"))
    (folder / "plain_state.json").write_text(json.dumps({"steps": steps, "scheduler": scheduler.state_dict()}))


def _load_plain(folder: Path, module, optimizer, scheduler) -> int:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "plain_state.safetensors"))
    module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = dict(module.named_parameters())
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, _, slot = key[6:].rpartition(".")
            current = optimizer.state[params[name]]
            current[slot] = value.reshape(()) if slot == "step" else value
    meta = json.loads((folder / "plain_state.json").read_text())
    scheduler.load_state_dict(meta["scheduler"])
    # The scheduler's state holds the learning rate of the next step, but only its own
    # step() writes it into the optimizer: without this, the first step after a restore
    # would take the learning rate of step 0.
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    return int(meta["steps"])
