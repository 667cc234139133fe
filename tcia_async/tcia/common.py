"""What the stages share: their prompt files, the shape of a stage's chat body, and the context placeholder.

Every body puts the static part first (the stage's system prompt, then the schema the engine adds) and the item
last, in tagged blocks, so a provider's prompt cache serves the repeated prefix.

An instruction takes its context through one `{context}` placeholder, usually in a block of its own between
[CONTEXT] and [END CONTEXT] lines (compose and evol write it, pair fills it).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from importlib import resources
from typing import Any


@functools.cache
def system_prompt(name: str) -> str:
    """The text of tcia/prompts/NAME.md (read once)."""
    return resources.files("tcia_async.tcia").joinpath(f"prompts/{name}.md").read_text(encoding="utf-8").strip()


def body(stage_prompt: str, item: str, *, model: str, temperature: float | None = None,
         max_tokens: int | None = None) -> dict[str, Any]:
    """A chat body: the stage's system prompt, then one user message ending with the item."""
    out: dict[str, Any] = {"model": model, "messages": [
        {"role": "system", "content": system_prompt(stage_prompt)},
        {"role": "user", "content": item},
    ]}
    if temperature is not None:
        out["temperature"] = temperature
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    return out


def block(tag: str, text: str) -> str:
    """`<tag>\\ntext\\n</tag>`, with a closing tag inside the text defused so the block cannot end early."""
    return f"<{tag}>\n{text.replace(f'</{tag}>', f'</ {tag}>')}\n</{tag}>"


def numbered(lines: Iterable[str]) -> str:
    return "\n".join(f"{i}. {' '.join(line.split())}" for i, line in enumerate(lines, 1))


PLACEHOLDER = "{context}"
CONTEXT_BLOCK = f"[CONTEXT]\n{PLACEHOLDER}\n[END CONTEXT]"
_BLOCK = re.compile(r"\s*\[CONTEXT\]\s*\{context\}\s*\[END CONTEXT\]\s*")


def placeholder_problem(prompt: str) -> str | None:
    """What is wrong with an instruction's placeholder (it must be there exactly once), or None."""
    n = prompt.count(PLACEHOLDER)
    return None if n == 1 else f"the instruction must contain the placeholder {PLACEHOLDER} exactly once (found {n})"


def fill(prompt: str, context: str | None) -> str:
    """The instruction with `context` in its placeholder; None: without a context (its block taken out)."""
    if context is None:
        return _BLOCK.sub("\n", prompt).replace(PLACEHOLDER, "").strip()
    return prompt.replace(PLACEHOLDER, context)


def score_problem(**scores: int) -> str | None:
    """What is wrong with scores that must be integers from 1 to 5, or None."""
    bad = [f"{name}={value}" for name, value in scores.items() if not 1 <= value <= 5]
    return f"scores must be integers from 1 to 5 ({', '.join(bad)})" if bad else None
