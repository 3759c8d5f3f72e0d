"""Chat prompts as files: `cir/generate/prompts/TASK.vN.yaml`, a list of messages with
`{ref_caption}`, `{tgt_caption}` and `{n}` placeholders.

A prompt is named by its file stem (`modify.v1`), which carries its version; the
triplets' `generator` column records it, so texts from two prompt versions never mix
unnoticed. A path to a YAML file of the same form is accepted too.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

PROMPT_DIR = Path(__file__).parent / "prompts"
PLACEHOLDERS = {"ref_caption", "tgt_caption", "n"}
ROLES = {"system", "user", "assistant"}


def known_prompts() -> list[str]:
    return sorted(p.stem for p in PROMPT_DIR.glob("*.yaml"))


@dataclass(frozen=True)
class ChatPrompt:
    name: str
    messages: tuple[tuple[str, str], ...]   # (role, content template)

    def render(self, ref_caption: str, tgt_caption: str, n: int = 1) -> list[dict]:
        """OpenAI-style messages for one caption pair."""
        values = {"ref_caption": _caption(ref_caption), "tgt_caption": _caption(tgt_caption), "n": n}
        return [{"role": role, "content": content.format(**values)} for role, content in self.messages]


def _caption(caption: str) -> str:
    # The templates end the caption's sentence themselves.
    return (caption or "").strip().rstrip(".")


def load_prompt(name: str) -> ChatPrompt:
    """The prompt `name` (a file stem under prompts/, or a path to a YAML file)."""
    import yaml

    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = PROMPT_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown prompt {name!r}: no file {path} (shipped: {', '.join(known_prompts())})")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"prompt {path}: needs a non-empty 'messages' list")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"prompt {path}: message {i} needs a role ({', '.join(sorted(ROLES))}) "
                             "and a string content")
        fields = {f for _, f, _, _ in string.Formatter().parse(m["content"]) if f is not None}
        if fields - PLACEHOLDERS:
            raise ValueError(f"prompt {path}: message {i} has unknown placeholder(s) "
                             f"{sorted(fields - PLACEHOLDERS)}; known: {sorted(PLACEHOLDERS)}")
        parsed.append((m["role"], m["content"]))
    if parsed[-1][0] != "user":
        raise ValueError(f"prompt {path}: the last message must be the user's")
    return ChatPrompt(path.stem, tuple(parsed))
