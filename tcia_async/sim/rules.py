"""What the simulator answers: plain text, generic JSON-schema instances, and rule answers for our stages.

Everything here is a pure function of (request content, seed): no clock, no global random state.

Generic instances honour: type (and type lists), enum, const, properties/required/additionalProperties/
minProperties, items/prefixItems/minItems/maxItems/uniqueItems, minLength/maxLength, minimum/maximum/exclusive
bounds (both drafts)/multipleOf, allOf (merged), anyOf, $ref to the same document, and the formats date-time,
date, time, email, uri, uuid, ipv4. Not honoured: `pattern`, `not`, `if/then/else`, dependent schemas;
`oneOf` is treated as `anyOf` (fine for discriminated unions, wrong for overlapping branches).
"""

from __future__ import annotations

import hashlib
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


_MODEL_LEAN: dict[str, float] = {}  # model name -> where in the length range its answers fall


def completion_length(max_tokens: int | None, h: int, model: str = "") -> int:
    """Output length for a plain prompt: between half and all of max_tokens (24..160 without a cap). The model's
    name sets where in that range its answers fall, so generators answering one prompt differ in length."""
    lean = _MODEL_LEAN.get(model)
    if lean is None:
        if len(_MODEL_LEAN) >= 256:
            _MODEL_LEAN.clear()
        digest = hashlib.blake2b(model.encode(), digest_size=8).digest()  # crc32 clusters similar names
        lean = _MODEL_LEAN[model] = int.from_bytes(digest, "little") % 1000 / 1000
    u = 0.6 * lean + 0.4 * ((h >> 17) % 1000 / 1000)
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
    """The content of the last `<tag>...</tag>` block: the item comes last, after framing that may name the tags."""
    end = text.rfind(f"</{tag}>")
    start = text.rfind(f"<{tag}>", 0, end) if end >= 0 else -1
    return text[start + len(tag) + 2:end].strip() if start >= 0 else None


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
    (re.compile(r"\bcustomer\b.*\b(email|message|ticket|complaint)|\bsupport ticket|\bcomplaint", _I),
     "Customer Support Response"),
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


def _hash(seed: int, *parts: str) -> int:
    """128 bits fixed by the item's texts and the run seed: which items a behaviour hits, stable across runs."""
    digest = hashlib.blake2b("\x1f".join((str(seed), *parts)).encode(), digest_size=16).digest()
    return int.from_bytes(digest, "little")


def _frac(h: int, k: int) -> float:
    """The k-th (0..7) independent number in [0, 1) drawn from h."""
    return ((h >> (16 * k)) & 0xFFFF) / 65536


_NUMBERED = re.compile(r"^\s*(\d+)[.)]\s*(.+?)\s*$")


def verify(message: str, seed: int = 0) -> dict:
    prompt = _norm(_tagged(message, "prompt") or "")
    block = _tagged(message, "constraints") or ""
    results = []
    for line in block.splitlines():
        m = _NUMBERED.match(line)
        if not m:
            continue
        covered = _norm(_own_placeholder(m.group(2))) in prompt
        results.append({
            "index": int(m.group(1)),
            "covered": covered,
            "reason": f"{PREFIX} The constraint {'appears' if covered else 'does not appear'} in the prompt.",
        })
    return {"results": results}


COMPOSE_GAP = 0.15  # share of items whose first composition leaves one constraint out
COMPOSE_STUCK = 0.03  # share of items (among those) whose refinements never put it back


def compose(message: str, seed: int = 0) -> dict:
    """Base query, constraints one a line, the context placeholder. Some first attempts leave a constraint out
    (so verify finds a gap and refine runs); for a few items every refinement does (the retry cap and the drop)."""
    base = _tagged(message, "base_query") or ""
    block = _tagged(message, "constraints") or ""
    lines = [_BULLET.sub("", ln).strip() for ln in block.splitlines()]
    lines = [ln for ln in lines if ln]
    h = _hash(seed, "compose", base, *lines)
    refining = _tagged(message, "critique") is not None
    if _frac(h, 0) < (COMPOSE_STUCK if refining else COMPOSE_GAP):
        # Only a constraint that verify's containment check can miss: its text is in no other line.
        rest = [_norm("\n".join([base, *lines[:i], *lines[i + 1:]])) for i in range(len(lines))]
        gaps = [i for i, ln in enumerate(lines) if _norm(ln) not in rest[i]]
        if gaps:
            del lines[gaps[(h >> 64) % len(gaps)]]
    # A requirement (or the base query) may carry its own placeholder ("Use the notes in {context}."): it points at
    # the block instead, as the compose prompt asks, so the placeholder stays there once.
    lines = [_own_placeholder(ln) for ln in lines]
    return {"prompt": "\n".join([_own_placeholder(base), *lines, "[CONTEXT]\n{context}\n[END CONTEXT]"])}


_PLACEHOLDER = re.compile(r"\{context\}|\[context\]", _I)


def _own_placeholder(text: str) -> str:
    return _PLACEHOLDER.sub("the context below", text)


# ---- validate: limits and languages that contradict each other

_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
                 "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "fifteen": 15, "twenty": 20}
_AT_MOST = {"at most", "no more than", "not more than", "up to", "under", "fewer than", "less than",
            "a maximum of", "maximum of", "within"}
_AT_LEAST = {"at least", "no fewer than", "no less than", "more than", "over", "a minimum of", "minimum of"}
_LIMIT = re.compile(
    r"\b(?:(" + "|".join(sorted(_AT_MOST | _AT_LEAST | {"exactly"}, key=len, reverse=True)) + r")\s+)?"
    r"(\d+|" + "|".join(_NUMBER_WORDS) + r")\s+"
    r"(bullet points?|bullets?|words?|sentences?|paragraphs?|characters?|items?|lines?|examples?|questions?|"
    r"sections?|steps?|points?|tips?|ideas?|pages?|tokens?)\b(?:\s+or\s+(fewer|less|more)\b)?", _I)
_LANGUAGE_NAMES = (r"(english|french|german|spanish|italian|portuguese|chinese|japanese|korean|russian|arabic|dutch|"
                   r"hindi)")
# The language of the output: "answer in French", "write the summary in German", "translate ... into Spanish" (not
# "keep the labels in English", which is about part of the input).
_OUTPUT_LANGUAGE = re.compile(
    r"\b(?:(?:answer|respond|reply|write|written|output)(?:\s+[\w-]+){0,3}?\s+in|translat\w*\b[^.\n]*?\binto)\s+"
    + _LANGUAGE_NAMES + r"\b", _I)


def limits(text: str) -> dict[str, dict[str, set[int]]]:
    """Numeric limits by unit: {"word": {"max": {100}, "min": set(), "exact": set()}, ...}. A bare "one" is not
    a limit ("open with one sentence naming..."), nor are limits of one kind on one unit that a sentence gives
    twice ("a title under 60 characters and a description under 155 characters" limit two things)."""
    out: dict[str, dict[str, set[int]]] = {}
    for sentence in sentences(text):
        found: dict[tuple[str, str], set[int]] = {}
        for qualifier, number, unit, or_else in _LIMIT.findall(sentence):
            qualifier = " ".join(qualifier.lower().split())
            if or_else:  # "five words or fewer"
                qualifier = "at least" if or_else.lower() == "more" else "at most"
            number = number.lower()
            if number == "one" and not qualifier:
                continue
            unit = unit.lower().removesuffix("s").removesuffix(" point")
            kind = "max" if qualifier in _AT_MOST else "min" if qualifier in _AT_LEAST else "exact"
            found.setdefault((unit, kind), set()).add(int(number) if number.isdigit() else _NUMBER_WORDS[number])
        for (unit, kind), values in found.items():
            if len(values) == 1:
                out.setdefault(unit, {"max": set(), "min": set(), "exact": set()})[kind] |= values
    return out


def contradiction(text: str) -> str | None:
    """What makes the text contradict itself, if anything: two different limits of one kind on one unit, a lower
    limit above an upper one, or two different output languages."""
    for unit, k in limits(text).items():
        hi, lo, exact = k["max"], k["min"], k["exact"]
        if len(hi) > 1 or len(lo) > 1 or len(exact) > 1:
            values = ", ".join(str(n) for n in sorted(hi | lo | exact))
            return f"different limits on the number of {unit}s ({values})"
        if hi and lo and min(lo) > min(hi) or exact and (hi and min(exact) > min(hi) or lo and min(exact) < max(lo)):
            return f"limits on the number of {unit}s that cannot all hold"
    languages = sorted({m.lower() for m in _OUTPUT_LANGUAGE.findall(text)})
    if len(languages) > 1:
        return f"two output languages ({' and '.join(lang.title() for lang in languages)})"
    return None


VALIDITY_LOW = 0.10  # share of prompts whose validity is 3


def validate(message: str, seed: int = 0) -> dict:
    """Consistency 2 for a contradiction, else 4-5; validity 3 for about one prompt in ten, else 4-5."""
    prompt = _tagged(message, "prompt") or ""
    h = _hash(seed, "validate", prompt)
    if not prompt.strip():
        return {"validity": 1, "validity_reason": f"{PREFIX} The prompt is empty.",
                "consistency": 1, "consistency_reason": f"{PREFIX} The prompt is empty."}
    if _frac(h, 0) < VALIDITY_LOW:
        validity, why = 3, "Part of the intent is left unclear."
    else:
        validity, why = (5 if _frac(h, 1) < 0.5 else 4), "The parts are relevant and reflect a clear intent."
    conflict = contradiction(prompt)
    if conflict:
        consistency, because = 2, f"The prompt contradicts itself: {conflict}."
    else:
        consistency, because = (5 if _frac(h, 2) < 0.6 else 4), "No requirement conflicts with another."
    return {"validity": validity, "validity_reason": f"{PREFIX} {why}",
            "consistency": consistency, "consistency_reason": f"{PREFIX} {because}"}


# ---- on_task: does the candidate keep the seed's core request?

_WORD = re.compile(r"[^\W\d_]+")
_STOP = frozenset("""
a an the and or but nor of to for in on at by with from into onto about as is are be been being was were this that
these those it its their them they your you my me our we us he she his her please kindly can could would will shall
should must may might do does did done have has had not no so than then also just now each every all any some which
what who whom whose when while where how if up out below above following given provided here there such only
""".split())


def _stem(word: str) -> str:
    w = word.casefold()
    return w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w


def _words(text: str) -> list[str]:
    return [_stem(w) for w in _WORD.findall(text) if len(w) > 1]


def _content_words(text: str) -> list[str]:
    return [_stem(w) for w in _WORD.findall(text) if len(w) > 1 and w.casefold() not in _STOP]


def core_request(instruction: str) -> tuple[str | None, list[str]]:
    """The first sentence's content words (stemmed, in order, once each) and the first of them, its verb."""
    content = list(dict.fromkeys(_content_words(next(iter(sentences(instruction)), ""))))
    return (content[0] if content else None), content


def on_task(message: str, seed: int = 0) -> dict:
    """Same task when the candidate keeps the verb of the seed's first sentence and at least half of its content
    words."""
    verb, content = core_request(_tagged(message, "seed") or "")
    have = set(_words(_tagged(message, "candidate") or ""))
    kept = sum(w in have for w in content)
    same = not content or (verb in have and 2 * kept >= len(content))
    if same:
        reason = f"The candidate keeps the core request ({kept} of {len(content)} key words)."
    elif verb not in have:
        reason = f"The candidate no longer asks to '{verb}': a different request."
    else:
        reason = f"The candidate keeps only {kept} of {len(content)} key words of the request."
    return {"same_task": same, "reason": f"{PREFIX} {reason}"}


# ---- judge

JUDGE_DIMENSIONS = ("general_quality", "helpfulness", "instruction_following", "honesty", "truthfulness")


def judge(message: str, seed: int = 0) -> dict:
    """Five scores from a hash of the answer; short answers are less helpful, and an answer outside the
    instruction's word limits does not follow it."""
    answer = _tagged(message, "answer") or ""
    h = _hash(seed, "judge", answer)
    n_words = len(answer.split())
    out = {}
    for k, dim in enumerate(JUDGE_DIMENSIONS):
        u = _frac(h, k)
        score = 5 if u < 0.40 else 4 if u < 0.75 else 3 if u < 0.92 else 2
        out[dim] = {"score": score, "reason": f"{PREFIX} The answer reads as {_GRADES[score]} on this point."}
    cap = 2 if n_words < 15 else 3 if n_words < 40 else 5
    if out["helpfulness"]["score"] > cap:
        out["helpfulness"] = {"score": cap, "reason": f"{PREFIX} At {n_words} words the answer says too little."}
    words = limits(_tagged(message, "instruction") or "").get("word")
    if words:
        hi = min(words["max"] | words["exact"], default=None)
        lo = max(words["min"], default=None)
        if hi is not None and n_words > hi or lo is not None and n_words < lo:
            out["instruction_following"] = {
                "score": 2, "reason": f"{PREFIX} The answer has {n_words} words, outside the instruction's limit."}
    return out


_GRADES = {2: "weak", 3: "adequate", 4: "good", 5: "excellent"}


# ---- evol (the Evol-Instruct baseline)

EVOL_DRIFT = 0.15  # share of in-depth rewrites that also reword the first sentence
# Sentences an in-depth rewrite adds, by operation. They avoid the verbs instructions start with (write, list,
# summarize, explain, ...), so a drifted instruction does not get its seed's verb back by accident.
_EVOL_SENTENCES = {
    "add_constraints": ("Keep the response under 150 words.", "Number the key points.",
                        "Keep a formal tone throughout.", "Mention at least two concrete examples.",
                        "End with a one-sentence conclusion.", "Avoid technical jargon."),
    "deepen": ("Go beyond the obvious points and discuss the underlying causes.",
               "Consider how the situation might change over the next year.",
               "Address the trade-offs behind each recommendation."),
    "concretize": ("Focus specifically on budgets and deadlines.",
                   "Refer to named people and dates wherever possible.",
                   "Ground each point in a concrete example from a small company."),
    "increase_reasoning": ("Work through the problem step by step before the final conclusion.",
                           "Justify each conclusion with evidence from the input.",
                           "Weigh at least two alternatives before recommending one."),
    "complicate_input": ("The input may contain contradictory statements; point them out.",
                         "Assume part of the input is missing and note what is missing.",
                         "The input mixes two languages; handle both."),
}
_DRIFT_VERBS = ("Critique", "Reimagine", "Annotate", "Dramatize", "Reorganize", "Parody")
_BREADTH = ("Compile a catalogue of questions people might raise about {topic}.",
            "Invent a trivia quiz about {topic}.")


def evol(message: str, seed: int = 0) -> dict:
    """`breadth`: a different request on the seed's topic. Other operations: one sentence of their kind added,
    and for some rewrites the first sentence's verb replaced (the task drifts)."""
    text = _tagged(message, "instruction") or ""
    op = (_tagged(message, "operation") or "").strip().lower()
    variant = _tagged(message, "variant") or ""  # several rewrites of one parent by one operation differ
    h = _hash(seed, "evol", op, text, variant) if variant else _hash(seed, "evol", op, text)
    verb, _ = core_request(text)
    if op == "breadth":
        first = next(iter(sentences(text)), "")
        topic = [w.lower() for w in _WORD.findall(first) if len(w) > 1 and w.casefold() not in _STOP][1:4]
        forms = [f for f in _BREADTH if verb not in _words(f)] or list(_BREADTH)
        new = forms[h % len(forms)].format(topic="the " + " ".join(topic) if topic else "this subject")
        # The rest is dropped but the context placeholder, which the instruction must keep.
        block = _CONTEXT_BLOCK.search(text)
        if block:
            return {"instruction": f"{new}\n\n{text[block.start():]}"}
        return {"instruction": f"{new}\n{{context}}" if "{context}" in text else new}
    pool = _EVOL_SENTENCES.get(op) or tuple(s for group in _EVOL_SENTENCES.values() for s in group)
    start = (h >> 16) % len(pool)
    order = [s for s in pool[start:] + pool[:start] if verb not in _words(s)] or pool
    added = next((s for s in order if _norm(s) not in _norm(text)), order[0])
    if verb and _frac(h, 3) < EVOL_DRIFT:
        drift = [v for v in _DRIFT_VERBS if v.lower() != verb]
        new = drift[(h >> 80) % len(drift)]
        # Every occurrence (the verb coming back in a later sentence would keep the request on task), but not
        # the placeholder's own words ({context}, [CONTEXT]).
        text = re.sub(rf"(?<![{{\[])\b{re.escape(verb)}s?\b(?![}}\]])",
                      lambda m: new if m.group()[0].isupper() else new.lower(), text, flags=_I)
    block = _CONTEXT_BLOCK.search(text)  # the new sentence goes before a context placeholder block
    if block:
        before = text[:block.start()].rstrip()
        return {"instruction": f"{before} {added}{text[len(before):block.start()] or chr(10)}{text[block.start():]}"}
    text = text.rstrip()
    return {"instruction": f"{text}{' ' if text.endswith(('.', '!', '?')) else chr(10)}{added}"}


_CONTEXT_BLOCK = re.compile(r"^\[CONTEXT\]\s*$", re.MULTILINE)


# ---- dispatch

def last_user_text(messages: list) -> str:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return tokens._content_text(m.get("content"))
    return ""


def item_text(messages: list, tag: str) -> str:
    """The last user message holding a `<tag>` block (after a schema failure the item is in an earlier user
    message than the correction), else the last user message."""
    closing = f"</{tag}>"
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            text = tokens._content_text(m.get("content"))
            if closing in text:
                return text
    return last_user_text(messages)


def _decompose_rule(text: str, seed: int) -> dict:
    inner = _tagged(text, "instruction")
    return decompose(inner if inner is not None else text, seed)


# schema name -> (a tag the item's message holds, the rule: (that message, seed) -> hint)
_RULES = {
    "tcia_decompose": ("instruction", _decompose_rule),
    "tcia_compose": ("base_query", compose),
    "tcia_verify": ("prompt", verify),
    "tcia_validate": ("prompt", validate),
    "tcia_on_task": ("candidate", on_task),
    "tcia_judge": ("answer", judge),
    "tcia_evol": ("operation", evol),
}
_SCORE_SCHEMAS = {"tcia_validate", "tcia_judge", "tcia_on_task"}


def structured(name: str, schema: Any, messages: list, h: int, seed: int) -> Any:
    """The answer for a json_schema response_format: a rule hint for our stage names, then a valid instance."""
    rule = _RULES.get(name)
    hint = rule[1](item_text(messages, rule[0]), seed) if rule is not None else None
    return instance(schema, h, hint, scores=name in _SCORE_SCHEMAS)
