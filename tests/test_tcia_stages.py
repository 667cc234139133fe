"""Each TCIA stage alone, on hand-made inputs: the search, composition with its refine cap, the thresholds, the
on-task check, pairing, answering, judging and selection."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from tcia_async.engine import RequestFailed
from tcia_async.records import (ComposeAnswer, ConstraintCheck, ConstraintSet, EvolAnswer, Instruction, JudgeAnswer,
                                OnTaskAnswer, Pair, Response, Score, SeedTask, SetConstraint, ValidateAnswer,
                                VerifyAnswer)
from tcia_async.tcia import compose as compose_mod
from tcia_async.tcia.common import fill
from tcia_async.tcia.evol import hop_sizes
from tcia_async.tcia.explore import Settings, explore, literal_hop_counts
from tcia_async.tcia.judge import judge
from tcia_async.tcia.on_task import on_task
from tcia_async.tcia.pair import pairs
from tcia_async.tcia.respond import NoAnswer, respond
from tcia_async.tcia.select import select
from tcia_async.tcia.validate import validate


def seed(n: int = 3, placeholder: bool = False) -> SeedTask:
    cs = [SetConstraint(text=f"seed requirement {i}", category="Format") for i in range(n)]
    if placeholder:
        cs.append(SetConstraint(text="Use the transcript below.", category="Input Placeholder"))
    return SeedTask(seed_id="s1", instruction="Summarize the meeting transcript.", task_type="Meeting Summarization",
                    base_query="Summarize the meeting transcript.", constraints=cs)


POOL = [SetConstraint(text=f"pool requirement {i:02d}", category="Content", origin="retrieved") for i in range(40)]


def similar(c: SetConstraint) -> list[SetConstraint]:
    """A deterministic similarity: pool constraints by distance of their number to a number in c's text."""
    digits = "".join(ch for ch in c.text if ch.isdigit()) or "0"
    n = int(digits)
    return sorted((p for p in POOL if p.text != c.text), key=lambda p: (abs(int(p.text[-2:]) - n), p.text))


# -- explore ----------------------------------------------------------------------------------------------------


def test_literal_search_gives_the_papers_counts():
    e = explore(seed(3), POOL, similar, Settings(queue_limit=2700, repeats=10, sample=2000, literal=True))
    assert [(h.hop, h.sets) for h in e.hops] == [(1, 30), (2, 900), (3, 1890)]
    assert literal_hop_counts(2700, 10) == [30, 900, 1890]
    assert len(e.sets) == 2000 and sum(h.sampled for h in e.hops) == 2000
    assert all(h.sets_unique <= h.sets for h in e.hops)


def test_the_search_is_deterministic_from_the_run_seed_and_the_seed_id():
    a = explore(seed(), POOL, similar, Settings(sample=200), run_seed=1)
    b = explore(seed(), POOL, similar, Settings(sample=200), run_seed=1)
    c = explore(seed(), POOL, similar, Settings(sample=200), run_seed=2)
    assert msgspec.to_builtins(a) == msgspec.to_builtins(b)
    assert msgspec.to_builtins(a) != msgspec.to_builtins(c)


def test_our_rules_dedup_skip_and_protect():
    e = explore(seed(1, placeholder=True), POOL, similar, Settings(sample=10_000))
    keys = [frozenset(c.text.lower() for c in s.constraints) for s in e.sets]
    assert len(keys) == len(set(keys))  # no set twice
    for s in e.sets:
        texts = [c.text for c in s.constraints]
        assert len(texts) == len(set(texts))  # Add never repeats a constraint
        assert "Use the transcript below." in texts  # the context requirement is never removed or replaced
        assert 1 <= s.hop <= 3 and len(s.ops) == s.hop
        assert all(op in ("add", "remove", "replace") for op in s.ops)
        assert any(c.category != "Input Placeholder" for c in s.constraints)  # never emptied by Remove
    assert sum(h.sets_unique for h in e.hops) == sum(h.sampled for h in e.hops) == len(e.sets)


def test_replace_takes_one_of_the_most_similar():
    e = explore(seed(1), POOL, similar, Settings(sample=10_000, replace_choices=3, max_hop=1))
    replaced = [s for s in e.sets if s.ops == ["replace"]]
    got = {s.constraints[0].text for s in replaced}
    assert got <= {p.text for p in similar(seed(1).constraints[0])[:3]} and len(got) > 1


def test_evol_makes_as_many_per_hop_as_tcia_samples():
    from tcia_async.config import EvolSection, ExploreSection

    assert hop_sizes(EvolSection(), ExploreSection()) == [21, 638, 1340]
    assert hop_sizes(EvolSection(per_hop=5, hops=2), ExploreSection()) == [5, 5]


# -- a recording fake engine ------------------------------------------------------------------------------------


class Fake:
    """Answers chat_json with a function of (schema name, body); records every call."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[tuple[str, dict]] = []

    async def chat_json(self, body, typ, *, schema_name=None, sample=0, stage="", priority=0, check=None):
        self.calls.append((stage, body))
        value = self.answer(schema_name, body)
        if isinstance(value, BaseException):
            raise value
        if check is not None:
            assert check(value) is None, check(value)
        return value

    async def chat(self, body, sample=0, *, stage="", priority=0):
        self.calls.append((stage, body))
        text = self.answer("chat", body)
        if isinstance(text, BaseException):
            raise text
        return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def cset(n: int = 2) -> ConstraintSet:
    return ConstraintSet(seed_id="s1", index=7, hop=2, ops=["add", "replace"],
                         constraints=[SetConstraint(text=f"requirement {i}", category="Content") for i in range(n)])


@pytest.mark.anyio
async def test_compose_refines_until_every_constraint_is_covered():
    verdicts = iter([[False, True], [True, True]])

    def answer(name, body):
        if name == "tcia_compose":
            return ComposeAnswer(prompt="Summarize.\n[CONTEXT]\n{context}\n[END CONTEXT]")
        return VerifyAnswer(results=[ConstraintCheck(index=i + 1, covered=c, reason="r")
                                     for i, c in enumerate(next(verdicts))])

    fake = Fake(answer)
    ins = await compose_mod.compose(fake, seed(), cset(), model="m", refine_attempts=3)
    assert ins.dropped is None and ins.compose_attempts == 2 and ins.uncovered == []
    assert ins.id == "s1/00007" and ins.hop == 2 and ins.ops == ["add", "replace"]
    refine_body = [b for stage, b in fake.calls if stage == "refine"][0]["messages"][-1]["content"]
    assert "<critique>\n1. not covered: r\n</critique>" in refine_body and "<previous_prompt>" in refine_body


@pytest.mark.anyio
async def test_compose_drops_the_set_after_the_refine_cap():
    def answer(name, body):
        if name == "tcia_compose":
            return ComposeAnswer(prompt="Summarize.\n{context}")
        return VerifyAnswer(results=[ConstraintCheck(index=1, covered=True, reason=""),
                                     ConstraintCheck(index=2, covered=False, reason="missing")])

    fake = Fake(answer)
    ins = await compose_mod.compose(fake, seed(), cset(), model="m", refine_attempts=2)
    assert ins.dropped == "not_covered" and ins.compose_attempts == 3 and ins.uncovered == [2]
    assert [s for s, _ in fake.calls].count("refine") == 2


def _ins(**kw: Any) -> Instruction:
    return Instruction(id="s1/00001", seed_id="s1", method="tcia", hop=1, ops=["add"], constraints=[],
                       prompt="Summarize.\n[CONTEXT]\n{context}\n[END CONTEXT]", **kw)


@pytest.mark.anyio
@pytest.mark.parametrize("validity, consistency, dropped", [(4, 4, None), (3, 5, "invalid"), (5, 3, "inconsistent")])
async def test_validate_thresholds(validity, consistency, dropped):
    fake = Fake(lambda n, b: ValidateAnswer(validity=validity, validity_reason="v", consistency=consistency,
                                            consistency_reason="c"))
    ins = await validate(fake, _ins(), model="m", min_validity=4, min_consistency=4)
    assert ins.dropped == dropped and ins.validity.score == validity and ins.consistency.reason == "c"


@pytest.mark.anyio
async def test_on_task_decides_kept():
    ins = await on_task(Fake(lambda n, b: OnTaskAnswer(same_task=False, reason="questions, not a summary")),
                        "seed", _ins(), model="m")
    assert ins.dropped == "off_task" and not ins.kept and ins.on_task.ok is False
    ins = await on_task(Fake(lambda n, b: OnTaskAnswer(same_task=True, reason="")), "seed", _ins(), model="m")
    assert ins.kept and ins.dropped is None
    # An instruction already dropped (invalid) is still checked, for the ratio, and stays dropped.
    ins = await on_task(Fake(lambda n, b: OnTaskAnswer(same_task=True, reason="")), "seed",
                        _ins(dropped="invalid"), model="m")
    assert not ins.kept and ins.dropped == "invalid" and ins.on_task.ok is True


def test_pairing_draws_contexts_without_repeats_and_the_same_way_twice():
    contexts = [f"context {i}" for i in range(6)]
    a = pairs(_ins(), contexts, per_instruction=4, run_seed=3)
    b = pairs(_ins(), contexts, per_instruction=4, run_seed=3)
    assert [p.context_index for p in a] == [p.context_index for p in b]
    assert len({p.context_index for p in a}) == 4
    assert all(p.prompt == fill(_ins().prompt, contexts[p.context_index]) for p in a)
    assert all(f"context {p.context_index}" in p.prompt and "{context}" not in p.prompt for p in a)
    assert len(pairs(_ins(), contexts[:2], per_instruction=5)) == 2  # fewer contexts than asked: all of them
    alone = pairs(_ins(), [], per_instruction=5)
    assert len(alone) == 1 and alone[0].prompt == "Summarize." and alone[0].context_index is None


@pytest.mark.anyio
async def test_respond_keeps_the_generators_that_answered():
    def answer(name, body):
        if body["model"] == "broken":
            return RequestFailed.make("bad_request", "no")
        return f"answer of {body['model']}"

    p = Pair(id="s1/00001/0", instruction=_ins(), context_index=0, prompt="Summarize this.")
    out = await respond(Fake(answer), p, generators=["a", "broken", "b"])
    assert [r.generator for r in out.responses] == ["a", "b"]
    with pytest.raises(NoAnswer):
        await respond(Fake(answer), p, generators=["broken"])


@pytest.mark.anyio
async def test_judge_scores_every_answer_on_five_dimensions():
    def answer(name, body):
        good = "good" in body["messages"][-1]["content"]
        s = Score(score=5 if good else 2, reason="r")
        return JudgeAnswer(general_quality=s, helpfulness=s, instruction_following=s, honesty=s, truthfulness=s)

    p = Pair(id="x", instruction=_ins(), context_index=0, prompt="Q",
             responses=[Response(generator="a", text="a good answer"), Response(generator="b", text="a poor one")])
    out = await judge(Fake(answer), p, model="judge")
    assert [r.mean for r in out.responses] == [5.0, 2.0]
    assert set(out.responses[0].scores) == {"general_quality", "helpfulness", "instruction_following", "honesty",
                                            "truthfulness"}


def _pair(*responses: tuple[str, str, float]) -> Pair:
    return Pair(id="s1/00001/2", instruction=_ins(), context_index=2, prompt="Q",
                responses=[Response(generator=g, text=t, mean=m, scores={"helpfulness": int(m)})
                           for g, t, m in responses])


def test_select_best_ties_and_preference_margin():
    sft, pref = select(_pair(("a", "long answer here", 4.0), ("b", "short", 4.0), ("c", "bad", 2.6)), margin=1.0)
    assert sft["messages"][1]["content"] == "short"  # tie on the mean: the shorter wins
    # TRL's conversational preference format, as the SFT records: the same chat template applies to both.
    assert pref["prompt"] == [{"role": "user", "content": "Q"}]
    assert pref["chosen"] == [{"role": "assistant", "content": "short"}]
    assert pref["rejected"] == [{"role": "assistant", "content": "bad"}]
    sft, _ = select(_pair(("a", "same", 4.0), ("b", "same", 4.0)), margin=1.0)
    assert sft["metadata"]["generator"] == "a"  # then the earlier generator
    _, pref = select(_pair(("a", "x", 4.0), ("b", "y", 3.2)), margin=1.0)
    assert pref is None  # closer than the margin: no preference pair
    _, pref = select(_pair(("a", "x", 4.0)), margin=0.0)
    assert pref is None  # one answer: nothing to prefer it to
    assert sft["metadata"]["instruction_id"] == "s1/00001" and sft["metadata"]["context_index"] == 2


def test_stage_answers_have_strict_schemas():
    from tcia_async.engine.schema import strict_schema

    for typ in (ComposeAnswer, VerifyAnswer, ValidateAnswer, OnTaskAnswer, JudgeAnswer, EvolAnswer):
        schema = strict_schema(typ)
        assert schema["type"] == "object" and schema["additionalProperties"] is False


def test_compose_and_evol_ask_for_the_placeholder_in_the_same_words() -> None:
    from tcia_async.tcia.common import CONTEXT_BLOCK, placeholder_problem
    from tcia_async.tcia.evol import root

    assert placeholder_problem(f"Summarize.\n\n{CONTEXT_BLOCK}") is None
    assert placeholder_problem("Summarize {context} and {context}.") == \
        "the instruction must contain the placeholder {context} exactly once (found 2)"
    task = SeedTask(seed_id="s", instruction="Summarize the notes.", task_type="t", base_query="b", language=[],
                    contexts=[], constraints=[])
    assert root(task).prompt == f"Summarize the notes.\n\n{CONTEXT_BLOCK}" and fill(root(task).prompt, None) == \
        "Summarize the notes."
