"""What the LLM backends (`hf`, `http`, `vllm`) share: the task, its prompts, and the
turn from generated answers into candidate triplets.

An LLM backend only says how to run a chat prompt over a Dataset (`generate`). The
stage is then the same for all of them:

    pairs -> generate(modify prompt) -> [generate(reverse prompt)] -> PairTexts

`PairTexts` (Ray Data tasks: it holds no model) parses each answer into up to
`texts_per_pair` texts (`cir.generate.parse`) and writes one candidate row per text
(`base.candidate_rows`). A pair whose answer holds no text gives one row with an empty
text, so that the quality filter (`cir.generate.quality`) counts it.
"""
from __future__ import annotations

import abc
from dataclasses import asdict, dataclass

import pyarrow as pa

from cir.generate.base import Backend, candidate_rows, triplet_rows
from cir.generate.parse import parse_texts
from cir.generate.prompting import ChatPrompt, load_prompt
from cir.generate.quality import normalise

MAX_TEXTS_PER_PAIR = 16
# CPUs of a task that parses a batch of answers (no model: a fraction of a core).
PARSE_CPUS = 0.25


@dataclass
class TextTaskOptions:
    """`generate.options`: what the LLM backends are asked to write, and how to sample.

    temperature 0 is greedy decoding; `seed` makes sampling repeatable."""

    texts_per_pair: int = 3
    reverse: bool = True
    prompt: str = "modify.v1"
    reverse_prompt: str = "reverse.v1"
    max_new_tokens: int = 64
    reverse_max_new_tokens: int = 24
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if not 1 <= self.texts_per_pair <= MAX_TEXTS_PER_PAIR:
            raise ValueError(f"generate.options.texts_per_pair must be in 1..{MAX_TEXTS_PER_PAIR}, "
                             f"got {self.texts_per_pair}")
        for name in ("max_new_tokens", "reverse_max_new_tokens"):
            if not 1 <= getattr(self, name) <= 4096:
                raise ValueError(f"generate.options.{name} must be in 1..4096, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"generate.options.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generate.options.top_p must be in (0, 1], got {self.top_p}")
        load_prompt(self.prompt)
        if self.reverse:
            load_prompt(self.reverse_prompt)


@dataclass(frozen=True)
class ChatTask:
    """One prompt to run over every pair: its messages, how many texts it asks for and
    the answer's token budget; `output` names the column the answer goes to. The prompt
    is loaded on the driver and travels with the task: workers need no prompt file."""

    prompt: ChatPrompt
    n: int
    max_new_tokens: int
    output: str

    @property
    def prompt_name(self) -> str:
        return self.prompt.name

    def messages(self, ref_caption: str, tgt_caption: str) -> list[dict]:
        return self.prompt.render(ref_caption, tgt_caption, self.n)


class LLMBackend(Backend):
    """A backend that runs chat prompts on a language model."""

    source = "llm"

    def __init__(self, options, batch_size: int, num_actors: int, task: TextTaskOptions | None = None):
        super().__init__(options, batch_size, num_actors)
        self.task = task or TextTaskOptions()

    def validate(self) -> None:
        self.task.validate()
        self.validate_engine()

    def validate_engine(self) -> None:
        """The backend's own option checks (no data, no cluster)."""

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "task": asdict(self.task)}

    @property
    @abc.abstractmethod
    def model_id(self) -> str:
        """The model's name as the `generator` column records it."""

    @abc.abstractmethod
    def generate(self, ds, task: ChatTask, carry: list[str]):
        """`ds` with `task.output` (the answer) and `task.output + "_tokens"` (its token
        count) added; the columns in `carry` pass through, the rest may be dropped."""

    def tasks(self) -> list[ChatTask]:
        t = self.task
        tasks = [ChatTask(load_prompt(t.prompt), t.texts_per_pair, t.max_new_tokens, "answer")]
        if t.reverse:
            tasks.append(ChatTask(load_prompt(t.reverse_prompt), 1, t.reverse_max_new_tokens, "reverse_answer"))
        return tasks

    def generator_id(self) -> str:
        prompts = "+".join(task.prompt_name for task in self.tasks())
        return f"{self.name}:{self.model_id}@{prompts}"

    def generate_all(self, ds, tasks: list[ChatTask], carry: list[str]):
        """`generate` for each task in turn (a backend may run them in one pass)."""
        for task in tasks:
            ds = self.generate(ds, task, carry)
            carry = carry + [task.output, task.output + "_tokens"]
        return ds

    def apply(self, pairs):
        schema = pairs.schema().base_schema      # known without running: the pairs are in memory
        tasks = self.tasks()
        # Tasks, not an actor: parsing holds no model, and an actor would hold its CPU while
        # idle (beside the generator's and the filter's actors, a 2-CPU node had none left
        # for the generator's own row maps, and the stage waited for ever).
        return self.generate_all(pairs, tasks, list(schema.names)).map_batches(
            pair_texts, batch_size=self.batch_size, batch_format="pyarrow", num_cpus=PARSE_CPUS,
            fn_kwargs={"texts_per_pair": self.task.texts_per_pair, "generator": self.generator_id(),
                       "source": self.source, "pair_schema": schema,
                       "budgets": {t.output: t.max_new_tokens for t in tasks}})


def pair_texts(batch: pa.Table, **settings) -> pa.Table:
    """`map_batches` function: `PairTexts(**settings)` over one batch."""
    return PairTexts(**settings)(batch)


class PairTexts:
    """`map_batches` callable: answers of pairs -> candidate triplet rows."""

    def __init__(self, texts_per_pair: int, generator: str, source: str, pair_schema: pa.Schema,
                 budgets: dict[str, int]):
        self.n, self.generator, self.source, self.pair_schema = texts_per_pair, generator, source, pair_schema
        self.budgets = budgets      # answer column -> its max_new_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Rows that crossed a ray.data.llm processor as Python dicts lost their Arrow
        # types (a fixed_size_list `direction` comes back list<double>): restore them.
        for field in self.pair_schema:
            i = batch.column_names.index(field.name)
            if batch.schema.field(i).type != field.type:
                batch = batch.set_column(i, field, batch.column(i).cast(field.type))
        answers = self._answers(batch, "answer")
        reverse_answers = self._answers(batch, "reverse_answer") if "reverse_answer" in batch.column_names \
            else [None] * batch.num_rows
        keep, texts, reverses, index, repeats = [], [], [], [], []
        for row, (answer, reverse_answer) in enumerate(zip(answers, reverse_answers)):
            found = parse_texts(*answer)[: self.n] or [""]
            reverse = next(iter(parse_texts(*reverse_answer)), None) if reverse_answer else None
            seen = set()
            for j, text in enumerate(found):
                keep.append(row)
                texts.append(text)
                reverses.append(reverse)
                index.append(j)
                repeats.append(normalise(text) in seen)
                seen.add(normalise(text))
        out = triplet_rows(batch, keep, texts, reverses, self.source, [self.generator] * len(keep), index)
        return candidate_rows(out, batch, keep, repeats)

    def _answers(self, batch: pa.Table, column: str) -> list[tuple[str, bool]]:
        """(answer, truncated) per row: an answer that used its whole token budget was
        cut off."""
        budget = self.budgets[column]
        return [(text or "", tokens >= budget) for text, tokens in
                zip(batch.column(column).to_pylist(), batch.column(column + "_tokens").to_pylist())]

