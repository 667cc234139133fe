"""Live progress of a pipeline run: per stage in, out, failed and in flight; overall requests/s, tokens/min,
429s and cost so far. A rich table redrawn in place on a terminal; a plain line every 10 s otherwise (logs)."""

from __future__ import annotations

import sys
import time
from typing import Any

import anyio


class Progress:
    def __init__(self, pipe: Any, engine: Any, *, quiet: bool = False, every: float | None = None) -> None:
        self.pipe = pipe
        self.engine = engine
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.every = every if every is not None else (0.5 if self.tty else 10.0)
        self.started = time.monotonic()
        self._live: Any = None

    def overall(self) -> str:
        s = self.engine.stats
        el = max(1e-9, time.monotonic() - self.started)
        cost = f"  ${s.cost:,.4f}" if self.engine.config.prices else ""
        return (f"{el:,.0f} s  {s.sent / el:,.1f} req/s  {s.tokens * 60 / el:,.0f} tok/min  cached {s.cached}  "
                f"on the wire {s.in_flight}  429s {s.rate_limited}  retries {s.retries}{cost}")

    def line(self) -> str:
        stages = "  ".join(f"{st.name} {st.items_in}→{st.items_out}"
                           + (f" ({st.in_flight} busy)" if st.in_flight else "")
                           + (f" {st.failed} failed" if st.failed else "") for st in self.pipe.stats)
        return f"{self.overall()}\n  {stages}"

    def _table(self) -> Any:
        from rich.table import Table

        t = Table(title=self.overall(), title_justify="left", box=None, pad_edge=False)
        for col in ("stage", "in", "out", "failed", "in flight"):
            t.add_column(col, justify="left" if col == "stage" else "right")
        for st in self.pipe.stats:
            t.add_row(st.name, f"{st.items_in:,}", f"{st.items_out:,}", f"{st.failed:,}", f"{st.in_flight:,}")
        return t

    async def run(self) -> None:
        if self.quiet:
            return
        if self.tty:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._table(), console=Console(stderr=True), refresh_per_second=4, transient=False)
            self._live.start()
        while True:
            await anyio.sleep(self.every)  # a display refresh on a timer, not a wait for state
            if self._live is not None:
                self._live.update(self._table())
            else:
                print(self.line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.stop()
            self._live = None
