"""What the simulator answers: plain text, generic JSON-schema instances, and rule answers for our stages.

Everything here is a pure function of (request content, seed): no clock, no global random state.

Generic instances honour: type (and type lists), enum, const, properties/required/additionalProperties/
minProperties, items/prefixItems/minItems/maxItems/uniqueItems, minLength/maxLength, minimum/maximum/exclusive
bounds (both drafts)/multipleOf, allOf (merged), anyOf, $ref to the same document, and the formats date-time,
date, time, email, uri, uuid, ipv4. Not honoured: `pattern`, `not`, `if/then/else`, dependent schemas;
`oneOf` is treated as `anyOf` (fine for discriminated unions, wrong for overlapping branches).
"""

from __future__ import annotations

import math
import random
import re
import uuid
from typing import Any
from zlib import crc32

from tcia_async.sim import tokens

PREFIX = "[simulated]"
_I = re.IGNORECASE

# Words that are one cl100k token each with a leading space, so a text of n words costs exactly n tokens more
# than its prefix (checked at import: any word that is not one token is dropped).
_WORD_LIST = (
    "the data model answer result simple clear short summary point note value list table report task plan team "
    "meeting project example question user system text output input time work first next final main key new good "
    "small large fast total number case rule step part line group order test"
)
_WORDS = [w for w in _WORD_LIST.split() if tokens.count(" " + w) == 1] or ["the"]
_PREFIX_TOKENS = tokens.count(PREFIX)


# A fixed stream of words; a text of n words is one slice of it at an offset chosen by the request hash, so
# building an answer costs one string slice instead of n random draws.
_POOL_WORDS = 8192
_pool_list = random.Random(0x51A).choices(_WORDS, k=_POOL_WORDS)
_POOL = "".join(" " + w for w in _pool_list)
_OFFSETS = [0]
for _w in _pool_list:
    _OFFSETS.append(_OFFSETS[-1] + len(_w) + 1)


# Below the prefix's length (max_tokens of 1-3) the answer is the prefix cut short, as a capped model's would be.
_SHORT = {k: PREFIX[: max(1, round(len(PREFIX) * k / _PREFIX_TOKENS))] for k in range(1, _PREFIX_TOKENS)}
if tokens.ENCODING != "bytes/4":
    _SHORT = {k: tokens.decode_prefix(PREFIX, k) for k in range(1, _PREFIX_TOKENS)}


def text_of_length(n_tokens: int, h: int) -> str:
    """`[simulated]` followed by words, `n_tokens` tokens in all (the prefix cut short below 4 tokens); which
    words depends on `h`."""
    if n_tokens < _PREFIX_TOKENS:
        return _SHORT[max(1, n_tokens)]
    n = n_tokens - _PREFIX_TOKENS
    if n > _POOL_WORDS // 2:  # longer than the pool can serve from any offset: draw the words
        return PREFIX + "".join(" " + w for w in random.Random(h).choices(_WORDS, k=n))
    start = h % (_POOL_WORDS - n + 1)
    return PREFIX + _POOL[_OFFSETS[start]:_OFFSETS[start + n]]


def text_tokens(n_tokens: int, text: str) -> int:
    """Token count of `text` = text_of_length(n_tokens, ...), without encoding it when the count is known."""
    if tokens.ENCODING == "bytes/4":
        return tokens.count_once(text)
    return max(n_tokens, 1)


def completion_length(max_tokens: int | None, h: int) -> int:
    """Output length for a plain prompt: between half and all of max_tokens (24..160 without a cap)."""
    u = (h >> 17) % 1000 / 1000
    if max_tokens is None:
        return 24 + int(u * 137)
    return max(1, math.ceil(max_tokens * (0.5 + 0.5 * u)))


# ------------------------------------------------------------------------------------------------------------
# Generic instances of a JSON schema
# ------------------------------------------------------------------------------------------------------------

_SCORE_NAMES = re.compile(
    r"(^|_)(score|rating|validity|consistency|quality|helpfulness|following|honesty|truthfulness|uncertainty)"
    r"(_|$)|self_consistency",
    _I,
)
_REASON_NAMES = re.compile(r"reason|rationale|explanation|critique|feedback|comment|justification", _I)


class _Gen:
    """Builds one instance of a schema; `scores` makes score-like fields plausible (mostly 4-5, true)."""

    def __init__(self, root: Any, rng: random.Random, scores: bool) -> None:
        self.root = root
        self.rng = rng
        self.scores = scores

    def resolve(self, ref: str) -> Any:
        node = self.root
        if not ref.startswith("#"):
            return {}
        for part in ref[1:].split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            node = node[int(part)] if isinstance(node, list) else node.get(part, {})
        return node

    def gen(self, s: Any, hint: Any = None, name: str = "", depth: int = 0) -> Any:
        if s is True or s is None:
            s = {}
        if s is False:
            return None
        if "$ref" in s:
            target = self.resolve(s["$ref"])
            extra = {k: v for k, v in s.items() if k != "$ref"}
            s = {**target, **extra} if extra else target
            if s is True:
                s = {}
        if "allOf" in s:
            s = self._merge(s)
        if "const" in s:
            return s["const"]
        if "enum" in s:
            return self._pick_enum(s["enum"], hint)
        for key in ("anyOf", "oneOf"):
            if key in s:
                branches = s[key]
                rest = {k: v for k, v in s.items() if k != key}
                b = self._pick_branch(branches, hint, depth)
                if isinstance(b, dict) and rest:
                    b = {**rest, **b}
                return self.gen(b, hint, name, depth + 1)
        t = s.get("type")
        if isinstance(t, list):
            t = self._pick_type(t, hint, depth)
        if t is None:
            if "properties" in s or "required" in s or "additionalProperties" in s:
                t = "object"
            elif "items" in s or "prefixItems" in s:
                t = "array"
            elif hint is not None:
                return hint
            else:
                t = "string"
        return getattr(self, "_" + t, self._string)(s, hint, name, depth)

    # ---- combinators
    def _merge(self, s: dict) -> dict:
        out: dict = {k: v for k, v in s.items() if k != "allOf"}
        for part in s["allOf"]:
            if isinstance(part, dict) and "$ref" in part:
                part = self.resolve(part["$ref"])
            if not isinstance(part, dict):
                continue
            if "allOf" in part:
                part = self._merge(part)
            for k, v in part.items():
                if k == "properties":
                    out["properties"] = {**out.get("properties", {}), **v}
                elif k == "required":
                    out["required"] = list(dict.fromkeys([*out.get("required", []), *v]))
                else:
                    out.setdefault(k, v)
        return out

    def _pick_enum(self, values: list, hint: Any) -> Any:
        if hint is not None:
            if hint in values:
                return hint
            if isinstance(hint, str):
                key = hint.casefold().removesuffix(" constraints")
                for v in values:
                    if isinstance(v, str) and v.casefold().removesuffix(" constraints") == key:
                        return v
        return self.rng.choice(values)

    def _pick_branch(self, branches: list, hint: Any, depth: int) -> Any:
        if hint is not None:
            for b in branches:
                if isinstance(b, dict) and _type_fits(b.get("type"), hint):
                    return b
        if depth > 6:  # deep recursion: prefer a branch that ends it
            for b in branches:
                if isinstance(b, dict) and b.get("type") in ("null", "string", "boolean", "integer", "number"):
                    return b
        return branches[0] if hint is not None or depth > 6 else self.rng.choice(branches)

    def _pick_type(self, types: list, hint: Any, depth: int) -> str:
        for t in types:
            if hint is not None and _type_fits(t, hint):
                return t
        if depth > 6 and "null" in types:
            return "null"
        non_null = [t for t in types if t != "null"] or types
        return self.rng.choice(non_null)

    # ---- types
    def _null(self, s, hint, name, depth):
        return None

    def _boolean(self, s, hint, name, depth):
        if isinstance(hint, bool):
            return hint
        if self.scores:
            return self.rng.random() < 0.9
        return self.rng.random() < 0.5

    def _integer(self, s, hint, name, depth):
        lo, hi = _bounds(s, integer=True)
        mult = s.get("multipleOf")
        if isinstance(mult, int) and mult > 0:
            k_lo, k_hi = math.ceil(lo / mult), math.floor(hi / mult)
            if isinstance(hint, int) and not isinstance(hint, bool) and hint % mult == 0 and lo <= hint <= hi:
                return hint
            return self.rng.randint(k_lo, max(k_lo, k_hi)) * mult
        if isinstance(hint, int) and not isinstance(hint, bool) and lo <= hint <= hi:
            return hint
        if self.scores and _SCORE_NAMES.search(name or ""):
            want = 5 if self.rng.random() < 0.5 else 4
            if self.rng.random() < 0.1:
                want = 3
            return min(max(want, lo), hi)
        return self.rng.randint(lo, hi)

    def _number(self, s, hint, name, depth):
        lo, hi = _bounds(s, integer=False)
        mult = s.get("multipleOf")
        if isinstance(mult, (int, float)) and mult > 0:
            k_lo, k_hi = math.ceil(lo / mult), math.floor(hi / mult)
            return float(self.rng.randint(k_lo, max(k_lo, k_hi)) * mult)
        if isinstance(hint, (int, float)) and not isinstance(hint, bool) and lo <= hint <= hi:
            return hint
        if self.scores and _SCORE_NAMES.search(name or ""):
            return float(min(max(4 + self.rng.randint(0, 1), lo), hi))
        # Integral values are numbers too; fall back to them when the open interval is narrow.
        v = round(lo + (hi - lo) * self.rng.random(), 3)
        return v if lo <= v <= hi else lo

    def _string(self, s, hint, name, depth):
        lo = int(s.get("minLength", 0))
        hi = s.get("maxLength")
        hi = int(hi) if hi is not None else None
        if isinstance(hint, str):
            v = hint
        else:
            fmt = s.get("format")
            v = _FORMATS[fmt](self.rng) if fmt in _FORMATS else None
            if v is None:
                if _REASON_NAMES.search(name or ""):
                    v = f"{PREFIX} The {name.replace('_', ' ')} is plausible for a simulated answer."
                else:
                    v = PREFIX + "".join(" " + w for w in self.rng.choices(_WORDS, k=self.rng.randint(1, 6)))
        if hi is not None and len(v) > hi:
            v = v[:hi]
        if len(v) < lo:
            v = v + "x" * (lo - len(v))
        return v

    def _array(self, s, hint, name, depth):
        lo = int(s.get("minItems", 0))
        hi = s.get("maxItems")
        hi = int(hi) if hi is not None else None
        prefix = s.get("prefixItems") or (s["items"] if isinstance(s.get("items"), list) else [])
        items = s.get("items") if isinstance(s.get("items"), (dict, bool)) else s.get("additionalItems", {})
        if isinstance(hint, list):
            n = len(hint)
        elif depth > 6:
            n = lo
        else:
            n = self.rng.randint(lo, lo + 3)
        n = max(n, lo, len(prefix) if s.get("minItems") is None else 0)
        if hi is not None:
            n = min(n, hi)
        if items is False:
            n = min(n, len(prefix))
        out: list = []
        seen: set = set()
        unique = s.get("uniqueItems", False)
        attempts = 0
        while len(out) < n and attempts < 8 * n + 8:
            i = len(out)
            sub = prefix[i] if i < len(prefix) else items
            h = hint[i] if isinstance(hint, list) and i < len(hint) and attempts == i else None
            v = self.gen(sub, h, name, depth + 1)
            attempts += 1
            if unique:
                key = repr(v)
                if key in seen:
                    continue
                seen.add(key)
            out.append(v)
        return out

    def _object(self, s, hint, name, depth):
        props: dict = s.get("properties") or {}
        required = s.get("required") or []
        hint_d = hint if isinstance(hint, dict) else {}
        if not props and hint_d and s.get("additionalProperties", True) is not False and not required:
            return hint_d
        out: dict = {}
        for key, sub in props.items():
            if depth > 6 and key not in required:
                continue
            out[key] = self.gen(sub, hint_d.get(key), key, depth + 1)
        for key in required:  # required without a schema: anything goes
            if key not in out:
                out[key] = self.gen({}, hint_d.get(key), key, depth + 1)
        extra = s.get("additionalProperties", True)
        want = int(s.get("minProperties", 0))
        i = 0
        while len(out) < want and extra is not False:
            out[f"extra_{i}"] = self.gen(extra if isinstance(extra, dict) else {}, None, "", depth + 1)
            i += 1
        return out


def _type_fits(t: Any, v: Any) -> bool:
    if isinstance(t, list):
        return any(_type_fits(x, v) for x in t)
    if t is None:
        return True
    if t == "string":
        return isinstance(v, str)
    if t == "boolean":
        return isinstance(v, bool)
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t == "object":
        return isinstance(v, dict)
    if t == "array":
        return isinstance(v, list)
    if t == "null":
        return v is None
    return False


def _bounds(s: dict, integer: bool) -> tuple:
    lo = s.get("minimum")
    hi = s.get("maximum")
    xlo = s.get("exclusiveMinimum")
    xhi = s.get("exclusiveMaximum")
    step = 1 if integer else 1e-3
    # Draft 4 writes exclusive bounds as booleans beside minimum/maximum.
    if xlo is True and lo is not None:
        lo = lo + step
    elif isinstance(xlo, (int, float)) and not isinstance(xlo, bool):
        lo = xlo + step if lo is None else max(lo, xlo + step)
    if xhi is True and hi is not None:
        hi = hi - step
    elif isinstance(xhi, (int, float)) and not isinstance(xhi, bool):
        hi = xhi - step if hi is None else min(hi, xhi - step)
    if lo is None and hi is None:
        lo, hi = 0, 100
    elif lo is None:
        lo = hi - 100
    elif hi is None:
        hi = lo + 100
    if integer:
        lo, hi = math.ceil(lo), math.floor(hi)
    return lo, max(lo, hi)


_FORMATS = {
    "date-time": lambda r: f"2025-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}T{r.randint(0, 23):02d}:00:00Z",
    "date": lambda r: f"2025-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
    "time": lambda r: f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:00Z",
    "email": lambda r: f"sim{r.randint(0, 999)}@example.com",
    "uri": lambda r: f"https://example.com/sim/{r.randint(0, 999)}",
    "uuid": lambda r: str(uuid.UUID(int=r.getrandbits(128), version=4)),
    "ipv4": lambda r: f"192.0.2.{r.randint(1, 254)}",
}


def instance(schema: Any, h: int, hint: Any = None, scores: bool = False) -> Any:
    """A valid instance of `schema`, deterministic in `h`; values from `hint` wherever they fit the schema."""
    return _Gen(schema, random.Random(h), scores).gen(schema, hint)


# ------------------------------------------------------------------------------------------------------------
# Rule answers for our stage schemas
# ------------------------------------------------------------------------------------------------------------

def _tagged(text: str, tag: str) -> str | None:
    m = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
    return m.group(1).strip() if m else None


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=\S)|\n+")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")


def sentences(text: str) -> list[str]:
    out = []
    for part in _SENTENCE.split(text):
        part = _BULLET.sub("", part).strip()
        if part:
            out.append(part)
    return out


_CATEGORY_RULES: list[tuple[str, re.Pattern]] = [
    ("Input Placeholder", re.compile(
        r"\{[a-z_ ]*\}|\[context\]|placeholder|\bbelow\b|the following|provided (text|document|transcript)", _I)),
    ("Language", re.compile(
        r"\bin (english|french|german|spanish|italian|portuguese|chinese|japanese|korean|russian|arabic|dutch|"
        r"hindi)\b|\blanguage\b|\btranslat", _I)),
    ("Format", re.compile(
        r"bullet|table|json|markdown|heading|section|\blist\b|format|numbered|paragraph|csv|yaml|code block", _I)),
    ("Style/Tone", re.compile(r"\btone\b|formal|friendly|neutral|style|\bvoice\b|casual|professional|polite", _I)),
    ("Numerical", re.compile(r"\d|\bat (most|least)\b|\bwords\b|\bsentences\b|\bcharacters\b|\bexactly\b|"
                             r"\b(one|two|three|four|five|six|seven|eight|nine|ten)\b", _I)),
]

_TASK_TYPES: list[tuple[re.Pattern, str]] = [
    # First match wins: the specific kinds of work before the generic verbs they contain.
    (re.compile(r"\bmeeting\b|\bminutes\b|stand-?up", _I), "Meeting Summarization"),
    (re.compile(r"\breview\b.*\b(code|diff|pull request|patch|function)\b|\bcode review", _I), "Code Review"),
    (re.compile(r"\bdebug|\bbug\b|\bfix\b.*\b(error|exception|crash)", _I), "Debugging"),
    (re.compile(r"unit tests?\b|test cases?\b", _I), "Test Case Writing"),
    (re.compile(r"\bregex|regular expression", _I), "Regex Writing"),
    (re.compile(r"\bgrammar\b|proofread|spelling", _I), "Grammar Correction"),
    (re.compile(r"product description|product listing", _I), "Product Description"),
    (re.compile(r"slogan|tagline|\bad copy\b|advert", _I), "Ad Copy Writing"),
    (re.compile(r"interview questions?", _I), "Interview Question Writing"),
    (re.compile(r"\brecipe\b|\bhow to\b|step-by-step guide|instructions for", _I), "How-To Writing"),
    (re.compile(r"\boutline\b", _I), "Outlining"),
    (re.compile(r"brainstorm|\bideas\b", _I), "Brainstorming"),
    (re.compile(r"tweet|social media|linkedin|instagram", _I), "Social Media Writing"),
    (re.compile(r"\bcompare\b|comparison|\bversus\b|\bvs\.?\b", _I), "Comparison"),
    (re.compile(r"\bplan\b|itinerary|schedule|agenda", _I), "Planning"),
    (re.compile(r"simplif|plain language|plain english", _I), "Text Simplification"),
    (re.compile(r"summar", _I), "Summarization"),
    (re.compile(r"translat", _I), "Translation"),
    (re.compile(r"\bsql\b", _I), "SQL Query Generation"),
    (re.compile(r"python|function|\bcode\b|script|program", _I), "Code Generation"),
    (re.compile(r"\bemail\b|\be-mail\b", _I), "Email Writing"),
    (re.compile(r"\bpoem\b|\bstory\b|haiku|limerick|lyrics", _I), "Creative Writing"),
    (re.compile(r"classif|categori[sz]e|sentiment", _I), "Text Classification"),
    (re.compile(r"extract", _I), "Information Extraction"),
    (re.compile(r"\bsolve\b|calculat|comput|equation", _I), "Mathematical Problem Solving"),
    (re.compile(r"\bexplain\b", _I), "Explanation"),
    (re.compile(r"\brewrite\b|paraphras", _I), "Text Rewriting"),
    (re.compile(r"\bquestion", _I), "Question Answering"),
    (re.compile(r"\btable\b|\bchart\b|\bdata\b.*\b(into|as) (a )?(paragraph|text|sentences)", _I), "Data-to-Text"),
]
_SKIP = {"a", "an", "the", "some", "me", "this", "that", "these", "those", "my", "your", "our", "their", "its",
         "please", "of", "to", "for", "short", "brief", "new"}


def category_of(sentence: str) -> str:
    for cat, rx in _CATEGORY_RULES:
        if rx.search(sentence):
            return cat
    return "Content"


def task_type_of(base_query: str) -> str:
    for rx, name in _TASK_TYPES:
        if rx.search(base_query):
            return name
    words = re.findall(r"[^\W\d_]+", base_query)  # letters of any script: "Écris" stays whole
    words = [w for w in words if w.lower() != "please"]
    if not words:
        return "General Task"
    verb = words[0]
    obj = next((w for w in words[1:] if w.lower() not in _SKIP), "")
    return f"{verb} {obj}".strip().title()


def decompose(instruction: str, seed: int) -> dict:
    parts = sentences(instruction)
    if len(parts) < 2:
        return {"complex": False, "language": ["en"], "tasks": []}
    base = parts[0]
    constraints = []
    for c in parts[1:]:
        cat = category_of(c)
        if (crc32(c.encode()) ^ seed) % 4 == 0:  # exercise the callers' label normalisation
            cat += " Constraints"
        constraints.append({"category": cat, "constraint": c, "simplified_query": f"{base} {c}"})
    return {
        "complex": True,
        "language": ["en"],
        "tasks": [{"task_type": task_type_of(base), "base_query": base, "constraints": constraints}],
    }


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


_NUMBERED = re.compile(r"^\s*(\d+)[.)]\s*(.+?)\s*$")


def verify(message: str) -> dict:
    prompt = _norm(_tagged(message, "prompt") or "")
    block = _tagged(message, "constraints") or ""
    results = []
    for line in block.splitlines():
        m = _NUMBERED.match(line)
        if not m:
            continue
        covered = _norm(m.group(2)) in prompt
        results.append({
            "index": int(m.group(1)),
            "covered": covered,
            "reason": f"{PREFIX} The constraint {'appears' if covered else 'does not appear'} in the prompt.",
        })
    return {"results": results}


def compose(message: str) -> dict:
    base = _tagged(message, "base_query") or ""
    block = _tagged(message, "constraints") or ""
    lines = [_BULLET.sub("", ln).strip() for ln in block.splitlines()]
    lines = [ln for ln in lines if ln]
    prompt = "\n".join([base, *lines, "[CONTEXT]\n{context}\n[END CONTEXT]"])
    return {"prompt": prompt}


def last_user_text(messages: list) -> str:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return tokens._content_text(m.get("content"))
    return ""


_SCORE_SCHEMAS = {"tcia_validate", "tcia_judge", "tcia_on_task"}


def structured(name: str, schema: Any, messages: list, h: int, seed: int) -> Any:
    """The answer for a json_schema response_format: a rule hint for our stage names, then a valid instance."""
    hint = None
    if name == "tcia_decompose":
        text = last_user_text(messages)
        inner = _tagged(text, "instruction")
        hint = decompose(inner if inner is not None else text, seed)
    elif name == "tcia_verify":
        hint = verify(last_user_text(messages))
    elif name == "tcia_compose":
        hint = compose(last_user_text(messages))
    return instance(schema, h, hint, scores=name in _SCORE_SCHEMAS)
