"""Structured answers: any schema gets a valid instance; our stage schemas get rule-based content."""

from __future__ import annotations

import json
import math
import re

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcia_async.sim import rules

pytestmark = pytest.mark.anyio


# ---------------------------------------------------------------------------------------------------------------
# A tiny JSON-schema validator for the subset the strategies below generate (written independently of the
# simulator's generator, so the two cannot share a mistake).
# ---------------------------------------------------------------------------------------------------------------

def _is(t: str, v) -> bool:
    return {
        "string": isinstance(v, str), "boolean": isinstance(v, bool), "null": v is None,
        "integer": isinstance(v, int) and not isinstance(v, bool),
        "number": isinstance(v, (int, float)) and not isinstance(v, bool),
        "object": isinstance(v, dict), "array": isinstance(v, list),
    }[t]


def check(v, s, root) -> list[str]:
    if "$ref" in s:
        name = s["$ref"].split("/")[-1]
        return check(v, root["$defs"][name], root)
    if "const" in s:
        return [] if v == s["const"] else [f"{v!r} != const {s['const']!r}"]
    if "enum" in s:
        return [] if v in s["enum"] else [f"{v!r} not in enum"]
    if "anyOf" in s:
        return [] if any(not check(v, b, root) for b in s["anyOf"]) else [f"{v!r} fits no anyOf branch"]
    t = s.get("type")
    if isinstance(t, list):
        return [] if any(not check(v, {**s, "type": x}, root) for x in t) else [f"{v!r} fits no type of {t}"]
    if t is not None and not _is(t, v):
        return [f"{v!r} is not {t}"]
    errs: list[str] = []
    if t in ("integer", "number"):
        if "minimum" in s and v < s["minimum"]:
            errs.append(f"{v} < minimum")
        if "maximum" in s and v > s["maximum"]:
            errs.append(f"{v} > maximum")
        if "exclusiveMinimum" in s and v <= s["exclusiveMinimum"]:
            errs.append(f"{v} <= exclusiveMinimum")
        if "exclusiveMaximum" in s and v >= s["exclusiveMaximum"]:
            errs.append(f"{v} >= exclusiveMaximum")
        if "multipleOf" in s and not math.isclose(v / s["multipleOf"], round(v / s["multipleOf"]), abs_tol=1e-9):
            errs.append(f"{v} not a multiple of {s['multipleOf']}")
    if t == "string":
        if len(v) < s.get("minLength", 0) or len(v) > s.get("maxLength", 10**9):
            errs.append(f"len({v!r}) out of bounds")
    if t == "array":
        if len(v) < s.get("minItems", 0) or len(v) > s.get("maxItems", 10**9):
            errs.append(f"{len(v)} items out of bounds")
        if s.get("uniqueItems") and len({json.dumps(x, sort_keys=True) for x in v}) != len(v):
            errs.append("items not unique")
        for x in v:
            errs += check(x, s.get("items", {}), root)
    if t == "object":
        props = s.get("properties", {})
        for k in s.get("required", []):
            if k not in v:
                errs.append(f"missing {k}")
        for k, x in v.items():
            if k in props:
                errs += check(x, props[k], root)
            elif s.get("additionalProperties") is False:
                errs.append(f"extra property {k}")
    return errs


def _numeric(t: str):
    base = st.integers(-50, 50) if t == "integer" else st.floats(-50, 50, allow_nan=False).map(lambda x: round(x, 2))

    @st.composite
    def build(draw):
        s: dict = {"type": t}
        lo = draw(st.none() | base)
        hi = draw(st.none() | base)
        if lo is not None and hi is not None and lo > hi:
            lo, hi = hi, lo
        if lo is not None:
            s[draw(st.sampled_from(["minimum", "exclusiveMinimum"]))] = lo
        if hi is not None:
            key = draw(st.sampled_from(["maximum", "exclusiveMaximum"]))
            gap = 2 if t == "integer" else 0.5  # keep the interval non-empty
            if lo is not None and hi - lo < gap:
                hi = lo + gap
            s[key] = hi
        if t == "integer" and lo is None and hi is None and draw(st.booleans()):
            s["multipleOf"] = draw(st.integers(2, 7))
        return s

    return build()


_strings = st.fixed_dictionaries({}, optional={
    "minLength": st.integers(0, 5), "maxLength": st.integers(5, 30),
    "format": st.sampled_from(["date-time", "date", "email", "uri", "uuid"]),
}).map(lambda d: {"type": "string", **d})
_enums = st.lists(st.text(min_size=1, max_size=8) | st.integers(), min_size=1, max_size=5, unique=True).map(
    lambda xs: {"enum": xs})
_leaf = (_strings | _numeric("integer") | _numeric("number") | st.just({"type": "boolean"})
         | st.just({"type": "null"}) | _enums | st.integers().map(lambda x: {"const": x})
         | st.just({"type": ["string", "null"]}) | st.just({"$ref": "#/$defs/Item"}))
_names = st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True)


def _extend(children):
    obj = st.dictionaries(_names, children, max_size=5).flatmap(lambda props: st.fixed_dictionaries({
        "type": st.just("object"),
        "properties": st.just(props),
        "required": st.lists(st.sampled_from(sorted(props)), unique=True) if props else st.just([]),
        "additionalProperties": st.booleans(),
    }))
    arr = st.tuples(children, st.integers(0, 3), st.integers(0, 3), st.booleans()).map(
        lambda a: {"type": "array", "items": a[0], "minItems": min(a[1], a[2]), "maxItems": max(a[1], a[2]),
                   **({"uniqueItems": True} if a[3] and a[0].get("type") in ("string", "integer") and
                      "maxLength" not in a[0] and "multipleOf" not in a[0] and "maximum" not in a[0] else {})})
    anyof = st.lists(children, min_size=1, max_size=3).map(lambda bs: {"anyOf": bs})
    return obj | arr | anyof


schemas = st.recursive(_leaf, _extend, max_leaves=12).map(
    lambda s: {**s, "$defs": {"Item": {"type": "object", "properties": {"name": {"type": "string"}},
                                       "required": ["name"], "additionalProperties": False}}})


@settings(max_examples=300, deadline=None)
@given(schema=schemas, h=st.integers(0, 2**64 - 1), scores=st.booleans())
def test_generic_instances_are_valid(schema, h, scores):
    value = rules.instance(schema, h, scores=scores)
    assert check(value, schema, schema) == []
    assert rules.instance(schema, h, scores=scores) == value  # deterministic


def test_checker_rejects_invalid_instances():  # the validator above must be able to fail
    s = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 3}}, "required": ["a"],
         "additionalProperties": False}
    assert check({"a": 4}, s, s) and check({}, s, s) and check({"a": 1, "b": 2}, s, s)
    assert check({"a": 2}, s, s) == []


# ---------------------------------------------------------------------------------------------------------------
# Rule answers through the SDK
# ---------------------------------------------------------------------------------------------------------------

CATEGORY_ENUM = ["Content", "Numerical", "Style/Tone", "Format", "Language", "Input Placeholder",
                 "Content Constraints", "Numerical Constraints", "Style/Tone Constraints", "Format Constraints",
                 "Language Constraints", "Input Placeholder Constraints"]
DECOMPOSE = {
    "type": "object",
    "properties": {
        "complex": {"type": "boolean"},
        "language": {"type": "array", "items": {"type": "string"}},
        "tasks": {"type": "array", "items": {
            "type": "object",
            "properties": {
                "task_type": {"type": "string"},
                "base_query": {"type": "string"},
                "constraints": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"category": {"type": "string", "enum": CATEGORY_ENUM},
                                   "constraint": {"type": "string"}, "simplified_query": {"type": "string"}},
                    "required": ["category", "constraint", "simplified_query"],
                    "additionalProperties": False}},
            },
            "required": ["task_type", "base_query", "constraints"], "additionalProperties": False}},
    },
    "required": ["complex", "language", "tasks"], "additionalProperties": False,
}


async def _structured(sim, name, schema, user):
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as c:
        r = await c.chat.completions.create(
            model="gpt-4.1", messages=[{"role": "system", "content": "rules"}, {"role": "user", "content": user}],
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                                    "strict": True}})
    obj = json.loads(r.choices[0].message.content)
    assert check(obj, schema, schema) == []
    return obj


INSTRUCTION = ("Summarize the meeting transcript below. Use bullet points for the main decisions. "
               "Keep it under 200 words. Write in a neutral tone. Answer in French. Mention every participant.")


async def test_decompose_rule(sim):
    obj = await _structured(sim, "tcia_decompose", DECOMPOSE,
                            f"Decompose this.\n<instruction>{INSTRUCTION}</instruction>")
    assert obj["complex"] is True and obj["language"] == ["en"]
    (task,) = obj["tasks"]
    assert task["task_type"] == "Meeting Summarization"  # the specific kind of work wins
    assert task["base_query"] == "Summarize the meeting transcript below."
    cats = [c["category"].removesuffix(" Constraints") for c in task["constraints"]]
    assert cats == ["Format", "Numerical", "Style/Tone", "Language", "Content"]
    assert [c["constraint"] for c in task["constraints"]][0] == "Use bullet points for the main decisions."
    for c in task["constraints"]:
        assert c["simplified_query"] == f"{task['base_query']} {c['constraint']}"


async def test_decompose_rule_simple_instruction_and_no_tags(sim):
    obj = await _structured(sim, "tcia_decompose", DECOMPOSE, "Write a poem about the sea.")
    assert obj["complex"] is False and obj["tasks"] == []


def test_decompose_categories_and_task_types():
    assert rules.category_of("Insert the [CONTEXT] here.") == "Input Placeholder"
    assert rules.category_of("Respond in German.") == "Language"
    assert rules.category_of("Format the answer as a markdown table.") == "Format"
    assert rules.category_of("Use a friendly voice.") == "Style/Tone"
    assert rules.category_of("Give at most three examples.") == "Numerical"
    assert rules.category_of("Mention the budget.") == "Content"
    assert rules.task_type_of("Write a SQL query that lists users") == "SQL Query Generation"
    assert rules.task_type_of("Translate this paragraph") == "Translation"
    assert rules.task_type_of("Draft an email to the team") == "Email Writing"
    assert rules.task_type_of("Solve the equation 2x = 4") == "Mathematical Problem Solving"
    assert rules.task_type_of("Describe the history of Rome") == "Describe History"
    # Some labels carry the " Constraints" suffix (deterministically per text) to exercise normalisation.
    many = rules.decompose("Do it. " + " ".join(f"Mention item {i}." for i in range(40)), seed=0)
    labels = [c["category"] for c in many["tasks"][0]["constraints"]]
    assert any(lb.endswith(" Constraints") for lb in labels) and any(not lb.endswith(" Constraints")
                                                                      for lb in labels)
    assert rules.decompose("Do it. " + " ".join(f"Mention item {i}." for i in range(40)), seed=0) == many


VERIFY = {"type": "object", "properties": {"results": {"type": "array", "items": {
    "type": "object", "properties": {"index": {"type": "integer"}, "covered": {"type": "boolean"},
                                     "reason": {"type": "string"}},
    "required": ["index", "covered", "reason"], "additionalProperties": False}}},
    "required": ["results"], "additionalProperties": False}


async def test_verify_rule_is_containment(sim):
    user = ("<prompt>Summarize the text.\nUse   BULLET\npoints\n[CONTEXT]\n{context}\n[END CONTEXT]</prompt>\n"
            "<constraints>\n1. use bullet points\n2. Write in French.\n3. Use bullet points only.\n</constraints>")
    obj = await _structured(sim, "tcia_verify", VERIFY, user)
    # Containment after case folding and whitespace normalisation, nothing looser.
    assert [(r["index"], r["covered"]) for r in obj["results"]] == [(1, True), (2, False), (3, False)]
    assert all(r["reason"].startswith("[simulated]") for r in obj["results"])


COMPOSE = {"type": "object", "properties": {"prompt": {"type": "string"}}, "required": ["prompt"],
           "additionalProperties": False}


async def test_compose_rule(sim):
    obj = await _structured(sim, "tcia_compose", COMPOSE,
                            "<base_query>Summarize the report.</base_query>\n<constraints>\n- Use bullet points.\n"
                            "Keep it short.\n</constraints>")
    assert obj["prompt"] == ("Summarize the report.\nUse bullet points.\nKeep it short.\n"
                             "[CONTEXT]\n{context}\n[END CONTEXT]")


JUDGE = {"type": "object", "properties": {
    "general_quality": {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5},
                                                         "reason": {"type": "string"}},
                        "required": ["score", "reason"], "additionalProperties": False},
    "validity_score": {"type": "integer", "minimum": 1, "maximum": 5},
    "on_task": {"type": "boolean"}},
    "required": ["general_quality", "validity_score", "on_task"], "additionalProperties": False}


async def test_score_schemas_get_plausible_scores(sim):
    scores, flags = [], []
    for i in range(20):
        obj = await _structured(sim, "tcia_judge", JUDGE, f"Judge answer {i}.")
        scores += [obj["general_quality"]["score"], obj["validity_score"]]
        flags.append(obj["on_task"])
        assert obj["general_quality"]["reason"].startswith("[simulated]")
    assert sum(s >= 4 for s in scores) >= 0.75 * len(scores)
    assert sum(flags) >= 0.7 * len(flags)


async def test_other_names_get_generic_instances(sim):
    obj = await _structured(sim, "anything", COMPOSE, "hello")
    assert re.match(r"\[simulated\]", obj["prompt"])


# ---------------------------------------------------------------------------------------------------------------
# Stage rules the pipeline relies on (tcia_compose, tcia_validate, tcia_on_task, tcia_judge, tcia_evol), called as
# the server calls them: a schema name, the stage's strict schema, the messages (system first, item last).
# ---------------------------------------------------------------------------------------------------------------

def _strict(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


SCORE = {"type": "integer", "minimum": 1, "maximum": 5}
VALIDATE = _strict({"validity": SCORE, "validity_reason": {"type": "string"},
                    "consistency": SCORE, "consistency_reason": {"type": "string"}})
ON_TASK = _strict({"same_task": {"type": "boolean"}, "reason": {"type": "string"}})
DIMENSION = _strict({"score": SCORE, "reason": {"type": "string"}})
JUDGE5 = _strict({d: DIMENSION for d in rules.JUDGE_DIMENSIONS})
EVOL = _strict({"instruction": {"type": "string"}})
SCHEMAS = {"tcia_compose": COMPOSE, "tcia_verify": VERIFY, "tcia_validate": VALIDATE, "tcia_on_task": ON_TASK,
           "tcia_judge": JUDGE5, "tcia_evol": EVOL}
SYSTEM = "You are a careful assistant. The item comes in tagged blocks such as <prompt> and <constraints>."


def ask(name: str, item: str, h: int = 1, seed: int = 0, follow_up: bool = False) -> dict:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Do the task.\n\n{item}"}]
    if follow_up:  # the engine's corrective turn after an answer that failed the schema
        messages += [{"role": "assistant", "content": "{}"},
                     {"role": "user", "content": "That answer does not match the required JSON schema (x). Reply "
                                                 "again with only a JSON object that matches it."}]
    obj = rules.structured(name, SCHEMAS[name], messages, h, seed)
    assert check(obj, SCHEMAS[name], SCHEMAS[name]) == []
    return obj


def numbered(lines) -> str:
    return "\n".join(f"{i}. {c}" for i, c in enumerate(lines, 1))


def compose_item(base: str, constraints: list[str], previous: str | None = None) -> str:
    item = f"<base_query>\n{base}\n</base_query>\n<constraints>\n{numbered(constraints)}\n</constraints>"
    if previous is not None:
        item += f"\n<previous_prompt>\n{previous}\n</previous_prompt>\n<critique>\n1. not covered: missing\n</critique>"
    return item


def gaps(prompt: str, constraints: list[str]) -> list[int]:
    found = ask("tcia_verify", f"<prompt>\n{prompt}\n</prompt>\n<constraints>\n{numbered(constraints)}\n</constraints>")
    return [r["index"] for r in found["results"] if not r["covered"]]


TOPICS = ["the meeting transcript", "the quarterly report", "the support ticket", "the code change", "the essay",
          "the press release", "the product page", "the lecture notes"]
STYLES = ["Use a neutral tone.", "Use bullet points.", "Keep it under 150 words.", "Answer in English.",
          "Mention every deadline.", "End with a question.", "Avoid jargon.", "Name the owner of each task."]


def synthetic_items(n: int) -> list[tuple[str, list[str]]]:
    """n different (base query, constraints) items, built without randomness."""
    out = []
    for i in range(n):
        base = f"Summarize {TOPICS[i % len(TOPICS)]} number {i}."
        out.append((base, [STYLES[(i + k * 3) % len(STYLES)] for k in range(1 + i % 3)]))
    return out


def test_compose_leaves_gaps_on_some_first_attempts_and_never_closes_a_few():
    items = synthetic_items(400)
    first_gap, stuck = [], []
    for base, cons in items:
        first = ask("tcia_compose", compose_item(base, cons))["prompt"]
        assert first.startswith(base + "\n") and first.endswith("\n[CONTEXT]\n{context}\n[END CONTEXT]")
        missing = gaps(first, cons)
        assert len(missing) <= 1
        if missing:
            first_gap.append((base, cons))
            refined = ask("tcia_compose", compose_item(base, cons, first))["prompt"]
            assert "{context}" in refined
            again = gaps(refined, cons)
            if again:
                assert again == missing  # a stuck item keeps leaving out the same constraint
                assert ask("tcia_compose", compose_item(base, cons, refined))["prompt"] == refined
                stuck.append((base, cons))
        else:  # an item composed whole at first is composed whole on a refinement too
            assert gaps(ask("tcia_compose", compose_item(base, cons, first))["prompt"], cons) == []
    assert 0.08 <= len(first_gap) / len(items) <= 0.25  # about 15 %
    assert 0.005 <= len(stuck) / len(items) <= 0.07  # about 3 %
    # Deterministic in the item: the same items hit whatever the request hash.
    base, cons = first_gap[0]
    assert gaps(ask("tcia_compose", compose_item(base, cons), h=99)["prompt"], cons)


def test_rules_find_the_item_before_a_corrective_turn():
    item = compose_item(*synthetic_items(1)[0])
    assert ask("tcia_compose", item, follow_up=True) == ask("tcia_compose", item)
    item = "<prompt>\nKeep it under 100 words.\nWrite at most 300 words.\n</prompt>"
    assert ask("tcia_validate", item, follow_up=True)["consistency"] == 2


@pytest.mark.parametrize("prompt", [
    "Summarize the transcript.\nLimit the summary to at most 100 words.\nUse at most 300 words.",
    "Summarize the transcript.\nKeep it under 100 words.\nWrite at least 200 words.",
    "Write a reply to the email.\nAnswer in French.\nRespond in German.",
    "Translate the text into Spanish.\nWrite the answer in English.",
])
def test_validate_flags_a_contradiction(prompt):
    v = ask("tcia_validate", f"<prompt>\n{prompt}\n[CONTEXT]\n{{context}}\n[END CONTEXT]\n</prompt>")
    assert v["consistency"] == 2
    assert v["consistency_reason"].startswith("[simulated]") and "contradicts" in v["consistency_reason"]


@pytest.mark.parametrize("prompt", [
    "Summarize the transcript.\nWrite at least 100 words.\nUse at most 300 words.",
    "Write SEO texts: a title under 60 characters and a description under 155 characters.",
    "Translate the dialogue into Arabic.\nKeep the speaker labels in English.",
    "Summarize the transcript in five words or fewer.\nUse a neutral tone.",
])
def test_validate_passes_requirements_that_can_all_hold(prompt):
    assert ask("tcia_validate", f"<prompt>\n{prompt}\n</prompt>")["consistency"] >= 4


def test_validate_scores_exercise_the_keep_threshold():
    scores = [ask("tcia_validate", f"<prompt>\n{base}\n" + "\n".join(cons) + "\n</prompt>")
              for base, cons in synthetic_items(300)]
    low = [s for s in scores if s["validity"] == 3]
    assert 0.05 <= len(low) / len(scores) <= 0.16  # about 10 %
    assert all(s["validity"] >= 3 and s["consistency"] >= 4 for s in scores)  # no contradiction among these
    assert {s["validity"] for s in scores} == {3, 4, 5} and {s["consistency"] for s in scores} == {4, 5}
    assert all(s["validity_reason"].startswith("[simulated]") for s in scores)


SEED = ("Summarize the meeting transcript below. Open with one sentence naming the participants. List every "
        "follow-up assignment with its owner and due date. Keep the tone neutral.")


def on_task(seed: str, candidate: str) -> bool:
    answer = ask("tcia_on_task", f"<seed>\n{seed}\n</seed>\n<candidate>\n{candidate}\n</candidate>")
    assert answer["reason"].startswith("[simulated]")
    return answer["same_task"]


def evolve(instruction: str, operation: str, seed: int = 0) -> str:
    return ask("tcia_evol", f"<instruction>\n{instruction}\n</instruction>\n<operation>{operation}</operation>",
               seed=seed)["instruction"]


def test_on_task_keeps_tcia_candidates_and_rejects_breadth_rewrites():
    composed = ask("tcia_compose", compose_item("Summarize the meeting transcript below.",
                                                ["Use at most 100 words.", "Mention every decision."]))["prompt"]
    assert on_task(SEED, composed)
    assert on_task(SEED, SEED)
    breadth = evolve(SEED, "breadth")
    assert breadth != SEED and not on_task(SEED, breadth)
    assert not on_task(SEED, "Write a poem about the sea.")
    # Keeping the verb is not enough: the request must keep at least half of its key words.
    assert not on_task(SEED, "Summarize a novel about dragons.")


OPERATIONS = ["add_constraints", "deepen", "concretize", "increase_reasoning", "complicate_input"]


def test_evol_in_depth_rewrites_add_a_sentence_and_some_drift_off_task():
    drifted = kept = 0
    for base, cons in synthetic_items(60):
        seed_text = " ".join([base, *cons])
        for op in OPERATIONS:
            new = evolve(seed_text, op)
            assert new != seed_text and len(rules.sentences(new)) == len(rules.sentences(seed_text)) + 1
            if rules.sentences(new)[0] == base:
                kept += 1
                assert on_task(seed_text, new)
            else:  # the first sentence was reworded: the task drifted
                drifted += 1
                assert not on_task(seed_text, new)
    assert 0.08 <= drifted / (drifted + kept) <= 0.25  # about 15 % per rewrite


def test_evol_breadth_is_off_task_for_every_seed():
    for base, cons in synthetic_items(100):
        seed_text = " ".join([base, *cons])
        new = evolve(seed_text, "breadth")
        assert new != seed_text and not on_task(seed_text, new)
    # The breadth form avoids the seed's own verb: a seed that asks to compile stays distinct.
    compiled = "Compile a catalogue of questions people might raise about tax law. Keep it short."
    assert not on_task(compiled, evolve(compiled, "breadth"))


def judge(instruction: str, answer: str) -> dict:
    scores = ask("tcia_judge", f"<instruction>\n{instruction}\n</instruction>\n<answer>\n{answer}\n</answer>")
    assert all(d["reason"].startswith("[simulated]") for d in scores.values())
    return {k: d["score"] for k, d in scores.items()}


def test_judge_scores_vary_with_the_answer():
    instruction = "Summarize the meeting transcript below.\n[CONTEXT]\nAlice: we ship on Friday.\n[END CONTEXT]"
    answers = [f"[simulated] The team will ship on Friday, answer variant {i}. " + "Details follow. " * 20
               for i in range(40)]
    means = [sum(judge(instruction, a).values()) / 5 for a in answers]
    assert len(set(means)) >= 4  # generators' answers get different means: selection and margins have work
    assert judge(instruction, answers[0]) == judge(instruction, answers[0])
    assert judge(instruction, "[simulated] Friday.")["helpfulness"] <= 2  # very short: little help


def test_judge_marks_an_answer_outside_the_word_limit():
    instruction = "Summarize the meeting transcript below in at most 20 words.\n[CONTEXT]\nAlice: hi.\n[END CONTEXT]"
    assert judge(instruction, "[simulated] " + "word " * 60)["instruction_following"] == 2
    short = ["[simulated] Alice greeted everyone " + "x" * i for i in range(30)]
    assert any(judge(instruction, a)["instruction_following"] >= 4 for a in short)


def test_plain_answers_differ_in_length_by_model():
    lengths = {m: [rules.completion_length(400, h * 7919 << 17, m) for h in range(200)]
               for m in ("gpt-4.1", "gpt-4o-mini", "gpt-4.1-mini", "gpt-4o")}
    assert all(200 <= n <= 400 for ns in lengths.values() for n in ns)
    means = sorted(sum(ns) / len(ns) for ns in lengths.values())
    assert means[-1] - means[0] > 40


def test_evol_keeps_the_context_placeholder_once():
    block = "[CONTEXT]\n{context}\n[END CONTEXT]"
    seeds = [f"{base} {' '.join(cons)}\n\n{block}" for base, cons in synthetic_items(40)]
    seeds.append(f"Context matters here. Read the context carefully.\n\n{block}")  # the verb is "context"
    for seed_text in seeds:
        for op in [*OPERATIONS, "breadth"]:
            for run_seed in range(3):
                new = evolve(seed_text, op, seed=run_seed)
                assert new.count("{context}") == 1 and new.endswith(block), (op, new)


def test_compose_points_a_requirements_own_placeholder_at_the_block():
    from tcia_async.sim.rules import compose, verify

    item = ("<base_query>\nSummarize the notes.\n</base_query>\n<constraints>\n1. Use the notes in {context}.\n"
            "2. Keep it short.\n</constraints>")
    prompt = compose(item)["prompt"]
    assert prompt.count("{context}") == 1  # what the stage's check requires
    checks = verify(f"<prompt>\n{prompt}\n</prompt>\n<constraints>\n1. Use the notes in {{context}}.\n"
                    "2. Keep it short.\n</constraints>")["results"]
    assert "Use the notes in the context below." in prompt and checks[0]["covered"]
