"""Files and the Batch API, in memory: upload, get, content, delete; create, get, cancel, list batches.

A batch is `validating` for the first half of `batch_delay_s`, `in_progress` for the second half, then its lines
are answered at once (same answers as online, no limits or faults, except `batch_fail_rate`) and it is
`completed` with an output file (OpenAI's format: `{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}` per line, input order) and, when some lines failed, an error file in the same
format. An input file that does not parse, or names another endpoint, fails the batch at validation.

Provider refusals, when configured: `batch_expire` (the first N batches to finish expire part way: answered lines
in the output file, the rest in the error file with code `batch_expired`), `batch_enqueued_tokens` (a model's
prompt tokens in batches in progress are capped: a batch over the cap fails at validation, or its create is
answered 400, with code `token_limit_exceeded`), `upload_quota_after` (uploads answered 429 insufficient_quota).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from tcia_async.sim import tokens

if TYPE_CHECKING:
    from tcia_async.sim.config import SimConfig
    from tcia_async.sim.server import Handlers

_TERMINAL = {"completed", "failed", "cancelled", "expired"}
_ENDPOINTS = {"/v1/chat/completions", "/v1/embeddings"}


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status=status,
                        headers={"Content-Type": "application/json"})


def _not_found(what: str, oid: str) -> web.Response:
    return _json({"error": {"message": f"No such {what}: '{oid}'. [simulated]", "type": "invalid_request_error",
                            "param": None, "code": None}}, 404)


def _bad(message: str, param: str | None = None) -> web.Response:
    return _json({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}},
                 400)


class BatchStore:
    def __init__(self, handlers: Handlers, cfg: SimConfig) -> None:
        self._h = handlers
        self._cfg = cfg
        self.files: dict[str, dict] = {}
        self._content: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self._lines: dict[str, list] = {}  # validated input lines per batch
        self._enqueued: dict[str, dict[str, int]] = {}  # prompt tokens by model of each batch in progress
        self._uploads = 0
        self._expired = 0
        self._fail_rng = random.Random(cfg.seed ^ 0xBA7C4)
        self._changed = asyncio.Event()
        self._n = 0
        self.spawn: Callable[..., Any] | None = None  # the simulator's task group start_soon

    def _new_id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{hashlib.blake2b(f'{self._cfg.seed}:{self._n}'.encode(), digest_size=12).hexdigest()}"

    def _notify(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    # ------------------------------------------------------------------------------------------------ files
    def add_file(self, filename: str, purpose: str, data: bytes) -> dict:
        fid = self._new_id("file-sim")
        obj = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
               "filename": filename, "purpose": purpose, "status": "processed", "status_details": None}
        self.files[fid] = obj
        self._content[fid] = data
        return obj

    async def upload(self, request: web.BaseRequest) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            return _bad("Uploads must be multipart/form-data with 'file' and 'purpose'. [simulated]")
        form = await request.post()
        purpose = form.get("purpose")
        upload = form.get("file")
        if not isinstance(purpose, str) or not purpose:
            return _bad("'purpose' is required", "purpose")
        if upload is None or isinstance(upload, str) or not hasattr(upload, "file"):
            return _bad("'file' is required", "file")
        quota = self._cfg.upload_quota_after
        if quota is not None and self._uploads >= quota:
            return _json({"error": {"message": "You exceeded your current quota, please check your plan and billing "
                                    "details. [simulated]", "type": "insufficient_quota", "param": None,
                                    "code": "insufficient_quota"}}, 429)
        data = upload.file.read()
        self._uploads += 1
        return _json(self.add_file(upload.filename or "upload.jsonl", purpose, data))

    async def list_files(self, request: web.BaseRequest) -> web.Response:
        purpose = request.query.get("purpose")
        data = [f for f in self.files.values() if purpose is None or f["purpose"] == purpose]
        return _json({"object": "list", "data": data, "has_more": False})

    def get_file(self, fid: str) -> web.Response:
        f = self.files.get(fid)
        return _json(f) if f else _not_found("file", fid)

    def file_content(self, fid: str) -> web.Response:
        data = self._content.get(fid)
        if data is None:
            return _not_found("file", fid)
        return web.Response(body=data, headers={"Content-Type": "application/octet-stream"})

    def delete_file(self, fid: str) -> web.Response:
        if self.files.pop(fid, None) is None:
            return _not_found("file", fid)
        self._content.pop(fid, None)
        return _json({"id": fid, "object": "file", "deleted": True})

    # ---------------------------------------------------------------------------------------------- batches
    async def create(self, request: web.BaseRequest) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _bad("We could not parse the JSON body of your request. [simulated]")
        if not isinstance(body, dict):
            return _bad("The request body must be a JSON object. [simulated]")
        fid = body.get("input_file_id")
        endpoint = body.get("endpoint")
        if fid not in self.files:
            return _bad(f"No such file: {fid!r}", "input_file_id")
        if endpoint not in _ENDPOINTS:
            return _bad(f"endpoint must be one of {sorted(_ENDPOINTS)}", "endpoint")
        window = body.get("completion_window", "24h")
        if self._cfg.batch_enqueued_tokens is not None and self._cfg.batch_token_limit_at == "create":
            over = self._over_token_limit(_tokens_by_model(self._content.get(fid, b"")))
            if over is not None:
                return _json({"error": {"message": over, "type": "invalid_request_error", "param": None,
                                        "code": "token_limit_exceeded"}}, 400)
        now = int(time.time())
        bid = self._new_id("batch_sim")
        batch = {
            "id": bid, "object": "batch", "endpoint": endpoint, "errors": None, "input_file_id": fid,
            "completion_window": window, "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": now, "in_progress_at": None, "expires_at": now + 86_400, "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
            "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        self.batches[bid] = batch
        if self._cfg.batch_delay_s is not None and self.spawn is not None:
            self.spawn(self._run, bid)
        self._notify()
        return _json(batch)

    def get(self, bid: str) -> web.Response:
        b = self.batches.get(bid)
        return _json(b) if b else _not_found("batch", bid)

    def cancel(self, bid: str) -> web.Response:
        b = self.batches.get(bid)
        if b is None:
            return _not_found("batch", bid)
        if b["status"] not in _TERMINAL:
            now = int(time.time())
            b["status"] = "cancelled"
            b["cancelling_at"] = b["cancelled_at"] = now
            self._lines.pop(bid, None)
            self._enqueued.pop(bid, None)
            self._notify()
        return _json(b)

    async def list(self, request: web.BaseRequest) -> web.Response:
        try:
            limit = max(1, min(100, int(request.query.get("limit", "20"))))
        except ValueError:
            return _bad("limit must be an integer", "limit")
        after = request.query.get("after")
        items = list(reversed(self.batches.values()))  # newest first, as OpenAI lists them
        if after is not None:
            ids = [b["id"] for b in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        page = items[:limit]
        return _json({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                      "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})

    # ------------------------------------------------------------------------------------------- lifecycle
    async def _run(self, bid: str) -> None:
        half = (self._cfg.batch_delay_s or 0.0) / 2
        await asyncio.sleep(half)
        self.advance(bid)
        await asyncio.sleep(half)
        self.advance(bid)

    def advance_all(self) -> None:
        for bid in list(self.batches):
            self.advance(bid)

    def advance(self, bid: str) -> None:
        """One step: validating -> in_progress (or failed), in_progress -> completed."""
        b = self.batches[bid]
        status = b["status"]
        if status == "validating":
            self._validate(b)
        elif status == "in_progress":
            self._complete(b)
        self._notify()

    def _validate(self, b: dict) -> None:
        now = int(time.time())
        errors = []
        lines = []
        ids: set[str] = set()
        raw = self._content.get(b["input_file_id"], b"")
        for no, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                errors.append({"code": "invalid_json_line", "message": "This line is not parseable as valid "
                               "JSON.", "param": None, "line": no})
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str) or "body" not in obj:
                errors.append({"code": "invalid_request", "message": "Each line needs custom_id, method, url and "
                               "body.", "param": None, "line": no})
                continue
            if obj.get("url") != b["endpoint"]:
                errors.append({"code": "mismatched_endpoint", "message": f"The url {obj.get('url')!r} does not "
                               f"match the batch endpoint {b['endpoint']!r}.", "param": "url", "line": no})
                continue
            if obj["custom_id"] in ids:
                errors.append({"code": "duplicate_custom_id", "message": "The custom_id for this request is a "
                               "duplicate of another request.", "param": "custom_id", "line": no})
                continue
            ids.add(obj["custom_id"])
            lines.append(obj)
        if not lines and not errors:
            errors.append({"code": "empty_file", "message": "The input file is empty.", "param": None,
                           "line": None})
        cfg = self._cfg
        if not errors and cfg.batch_enqueued_tokens is not None and cfg.batch_token_limit_at == "validate":
            mine = _tokens_by_model(raw)
            over = self._over_token_limit(mine)
            if over is not None:
                errors.append({"code": "token_limit_exceeded", "message": over, "param": None, "line": None})
            else:
                self._enqueued[b["id"]] = mine
        if errors:
            b.update(status="failed", failed_at=now, errors={"object": "list", "data": errors})
            return
        self._lines[b["id"]] = lines
        b["status"] = "in_progress"
        b["in_progress_at"] = now
        b["request_counts"] = {"total": len(lines), "completed": 0, "failed": 0}

    def _complete(self, b: dict) -> None:
        from tcia_async.sim.server import BadRequest  # the server module imports this one

        lines = self._lines.pop(b["id"], [])
        self._enqueued.pop(b["id"], None)
        out, err = [], []
        ledger = self._h.ledger
        expire_at = len(lines)
        if self._expired < self._cfg.batch_expire:
            self._expired += 1
            expire_at = len(lines) // 2
        for i, obj in enumerate(lines):
            self._n += 1
            rid = f"batch_req_sim{self._n}"
            req_id = f"req_sim_b{self._n}"
            if i >= expire_at:
                err.append({"id": rid, "custom_id": obj["custom_id"], "response": None, "error": {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the completion window expired."}})
                continue
            if self._fail_rng.random() < self._cfg.batch_fail_rate:
                body = {"error": {"message": "The server had an error processing this request. [simulated]",
                                  "type": "server_error", "param": None, "code": None}}
                err.append({"id": rid, "custom_id": obj["custom_id"],
                            "response": {"status_code": 500, "request_id": req_id, "body": body}, "error": None})
                continue
            try:
                ans = self._h.answer(obj["url"], obj["body"])
            except BadRequest as e:
                err.append({"id": rid, "custom_id": obj["custom_id"],
                            "response": {"status_code": e.status, "request_id": req_id, "body": e.body()},
                            "error": None})
                continue
            ledger.batch_ok += 1
            ledger.answered(ans.key, ans.prompt, ans.completion)
            out.append({"id": rid, "custom_id": obj["custom_id"],
                        "response": {"status_code": 200, "request_id": req_id, "body": ans.body}, "error": None})
        ledger.batch_failed += len(err)
        now = int(time.time())
        dump = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
        b["output_file_id"] = self.add_file(f"{b['id']}_output.jsonl", "batch_output",
                                            b"".join(orjson.dumps(x, option=dump) for x in out))["id"]
        if err:
            b["error_file_id"] = self.add_file(f"{b['id']}_error.jsonl", "batch_output",
                                               b"".join(orjson.dumps(x, option=dump) for x in err))["id"]
        if expire_at < len(lines):
            b.update(status="expired", expired_at=now)
        else:
            b.update(status="completed", finalizing_at=now, completed_at=now)
        b["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}

    def _over_token_limit(self, mine: dict[str, int]) -> str | None:
        """Why a batch with `mine` prompt tokens per model would go over the enqueued-token limit, or None."""
        limit = self._cfg.batch_enqueued_tokens
        assert limit is not None
        for model, n in mine.items():
            queued = sum(t.get(model, 0) for t in self._enqueued.values())
            if queued + n > limit:
                return (f"Enqueued token limit reached for {model} in organization org-sim. Limit: {limit:,} enqueued "
                        f"tokens. Please try submitting fewer tokens or wait for existing batches to complete. "
                        "[simulated]")
        return None

    async def wait_created(self, n: int) -> None:
        """Return once at least `n` batches were created."""
        while len(self.batches) < n:
            await self._changed.wait()

    async def wait(self, bid: str, status: str) -> dict:
        while True:
            b = self.batches.get(bid)
            if b is None:
                raise KeyError(bid)
            if b["status"] == status or b["status"] in _TERMINAL:
                return b
            await self._changed.wait()


def _tokens_by_model(raw: bytes) -> dict[str, int]:
    """Prompt tokens of an input file's lines, by model (lines that do not parse count nothing)."""
    out: dict[str, int] = {}
    for line in raw.splitlines():
        try:
            obj = orjson.loads(line)
            body = obj["body"]
            model = str(body.get("model") or "")
            if "messages" in body:
                n = tokens.count_messages(body["messages"])
            else:
                n = tokens.count_input(body.get("input"))[0]
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
            continue
        out[model] = out.get(model, 0) + n
    return out
