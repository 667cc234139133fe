"""The simulator's prompt caching: which requests report `usage.prompt_tokens_details.cached_tokens`, and how
many (OpenAI's rules: a shared prefix of 1,024 tokens or more, reported in steps of 128, per model, recently)."""

from __future__ import annotations

import openai
import pytest

from tcia_async.sim import tokens
from tcia_async.sim.prompt_cache import PromptCache

pytestmark = pytest.mark.anyio

# A static system prompt of about 1,300 tokens, and one of about 600 (too short alone).
LONG = "You compose instructions. " + " ".join(f"Rule {i}: keep every constraint on its own line." for i in range(110))
SHORT = "You judge answers. " + " ".join(f"Criterion {i}: score it honestly." for i in range(70))
FRAMING = "Compose one instruction from the blocks below. " + " ".join(
    f"Note {i}: the base query comes first and every constraint follows on its own line." for i in range(40))


def chat(system: str, item: str, framing: str = "Compose one instruction.") -> list:
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"{framing}\n\n<base_query>\n{item}\n</base_query>"}]


def cached(cache: PromptCache, messages: list, model: str = "gpt-4.1") -> int:
    return cache.cached_tokens(model, messages, tokens.count_messages(messages))


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_long_shared_system_prompt_is_cached_from_the_second_call():
    assert 1100 < tokens.count(LONG) < 1500 and tokens.count(SHORT) < 1000
    cache = PromptCache()
    assert cached(cache, chat(LONG, "Summarize the meeting.")) == 0  # the first of its kind pays in full
    second = chat(LONG, "Write a poem about the sea.")
    got = cached(cache, second)
    assert got % 128 == 0 and 1024 <= got <= tokens.count_messages(second)
    assert got >= (4 + tokens.count(LONG)) // 128 * 128  # at least the whole system message
    # Nothing is cached when the shared part is short, or for another model.
    assert cached(cache, chat(SHORT, "Summarize the meeting.")) == 0
    assert cached(cache, chat(SHORT, "Write a poem.")) == 0
    assert cached(cache, chat(LONG, "Write a poem.")), "another stage's calls in between evict nothing"
    assert cached(cache, chat(LONG, "Write a story."), model="gpt-4o-mini") == 0


def test_shared_framing_lines_of_the_user_message_count():
    cache = PromptCache()
    cached(cache, chat(SHORT, "Summarize the meeting.", FRAMING))
    got = cached(cache, chat(SHORT, "Write a poem.", FRAMING))
    # The short system prompt and the framing before the item together pass 1,024 tokens.
    assert got >= 1024 and got % 128 == 0
    assert got <= 4 + tokens.count(SHORT) + 4 + tokens.count(FRAMING + "\n\n<base_query>\n")


def test_a_repeated_request_is_cached_up_to_its_last_whole_step():
    cache = PromptCache()
    messages = chat(LONG, "Summarize the meeting.")
    cached(cache, messages)
    n = tokens.count_messages(messages)
    assert cached(cache, messages) == n // 128 * 128


def test_prefixes_expire_after_the_ttl_and_memory_is_bounded():
    clock = Clock()
    cache = PromptCache(ttl_s=300, max_prefixes=8, max_heads=4, clock=clock)
    cached(cache, chat(LONG, "item 0"))
    clock.t = 200
    assert cached(cache, chat(LONG, "item 1")) > 0  # used again: its five minutes start over
    clock.t = 499
    assert cached(cache, chat(LONG, "item 2")) > 0
    clock.t = 800
    assert cached(cache, chat(LONG, "item 3")) == 0  # unused for more than five minutes
    for i in range(50):
        cached(cache, chat(LONG + f" Variant {i}.", "x"))
    assert len(cache._prefixes) <= 8 and len(cache._heads) <= 4
    cache.clear()
    assert cached(cache, chat(LONG, "item 3")) == 0


async def test_cached_tokens_in_usage_through_the_sdk(sim):
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as c:
        first = await c.chat.completions.create(model="gpt-4.1", messages=chat(LONG, "Summarize the meeting."))
        second = await c.chat.completions.create(model="gpt-4.1", messages=chat(LONG, "Write a poem."))
        small = await c.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "Hi"}])
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # the field is always there
    assert small.usage.prompt_tokens_details.cached_tokens == 0
    got = second.usage.prompt_tokens_details.cached_tokens
    assert got >= 1024 and got % 128 == 0 and got <= second.usage.prompt_tokens
    sim.reset()  # forgets the cached prefixes too
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as c:
        again = await c.chat.completions.create(model="gpt-4.1", messages=chat(LONG, "Write a story."))
    assert again.usage.prompt_tokens_details.cached_tokens == 0
