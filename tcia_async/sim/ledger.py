"""The ledger of every request the simulator received (GET /sim/stats)."""

from __future__ import annotations

from collections import Counter


class Ledger:
    """Counts, exactly:

    - `requests`: every HTTP request received (any path but /sim/*), counted on arrival;
    - `by_status`: complete responses by status code (a non-JSON fault counts under "200", the status it sent);
      resets and truncated bodies are not complete responses and appear only in `faults`;
    - `ok`: successful answers delivered (chat, embeddings) — hangs that end in an answer count when delivered;
    - `unique` / `duplicates`: successful answers (online or batch lines) whose body (canonical JSON, sorted
      keys, plus the endpoint) was / was already answered successfully before — the paid calls a resume repeated;
    - `tokens`: prompt and completion tokens of the successful answers (online and batch);
    - `rate_limited`: 429s by cause (requests, tokens, too_large, insufficient_quota);
    - `faults`: injected faults by kind (500, 503, reset, truncated, non_json, hang), plus `client_gone`:
      answers not delivered because the client had left during the latency (e.g. it timed out);
    - `batch`: batch lines answered (`lines_ok`) and failed (`lines_failed`).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_status: Counter[int] = Counter()
        self.ok = 0
        self._seen: set[bytes] = set()
        self.duplicates = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.rate_limited: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.batch_ok = 0
        self.batch_failed = 0

    def answered(self, key: bytes, prompt: int, completion: int) -> None:
        """A successful answer to the body with content hash `key`."""
        seen = self._seen
        if key in seen:
            self.duplicates += 1
        else:
            seen.add(key)
        self.prompt_tokens += prompt
        self.completion_tokens += completion

    def snapshot(self) -> dict:
        return {
            "requests": self.requests,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "ok": self.ok,
            "unique": len(self._seen),
            "duplicates": self.duplicates,
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
            "rate_limited": dict(self.rate_limited),
            "faults": dict(self.faults),
            "batch": {"lines_ok": self.batch_ok, "lines_failed": self.batch_failed},
        }
