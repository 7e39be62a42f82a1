"""The live view of a sweep (replaces Ray Tune's own table; Tune runs with verbose=0).

Two styles (``--progress``; ``auto`` picks ``table`` on a terminal, ``lines`` otherwise):

* ``lines`` (logs, CI): one line per event, and a status block when something changed, at most
  every ``interval`` seconds::

    [01:02:03] start r320-resnet50-s0-multi-1a2b3c4d5e
    [01:09:40] r320-resnet50-s0-multi-1a2b3c4d5e epoch 3/6 AUROC 0.8123 loss 0.4012 1,870 img/s (7m37s; ETA 22m51s)
    [01:09:40] 12/50 finished, 4 running, 33 pending, 1 failed | ETA 3h05m (4 slots)

* ``table`` (a terminal): starts, finishes and failures scroll by as lines; below them one compact
  table of the running trials is redrawn in place after every event::

    12/50 finished, 4 running, 33 pending, 1 failed | ETA 3h05m (4 slots)
    trial                                  epoch  train loss  val AUROC  img/s   ETA
    r320-resnet50-s0-multi-1a2b3c4d5e      3/6    0.4012      0.8123     1,870   22m51s

A trial's ETA is its remaining epochs times its mean epoch time. The sweep's ETA is the remaining
epochs of every unfinished trial times an epoch duration (the trial's own mean when it has
finished an epoch, else the mean of trials with the same model and resolution, else the observed
seconds per pixel scaled to its resolution), divided by the number of trial slots, and never
less than the longest remaining trial. It is a rough guide.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import IO

from ray.tune.progress_reporter import TrialProgressCallback

#: Rows of running trials the table shows (the rest are counted).
TABLE_ROWS = 20


@dataclass
class TrialView:
    trial_id: str
    resolution: int = 0
    model: str = ""
    total_epochs: int = 0
    state: str = "pending"       # pending | running | finished | failed | retrying
    epoch: int = 0
    train_loss: float | None = None
    auroc: float | None = None   # the last epoch's mean validation AUROC
    best_auroc: float | None = None
    images_per_s: float | None = None
    epoch_seconds: list[float] = field(default_factory=list)
    where: str = ""

    def eta_seconds(self) -> float | None:
        if not self.epoch_seconds:
            return None
        return max(0, self.total_epochs - self.epoch) * sum(self.epoch_seconds) / len(self.epoch_seconds)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _num(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and value == value else "-"


def _tid(trial) -> str:
    return str(trial.config.get("trial", trial.config).get("trial_id", ""))


class SweepProgress(TrialProgressCallback):
    """Tune callback printing the sweep's progress; also usable without Tune (call the plain
    methods). It subclasses Tune's TrialProgressCallback only so that Tune does not add its own
    one, which prints "Trial ... completed. Last result: ..." even at verbose=0."""

    def __init__(self, trials: dict[str, dict], finished: list[str] | None = None,
                 slots: int = 1, interval: float = 30.0, out: IO[str] | None = None,
                 epoch_lines: bool = True, sweep_loc: str | None = None, style: str = "auto"):
        """``trials``: trial id -> {"resolution", "model", "total_epochs"} for every grid trial;
        ``finished``: ids already finished before this run (shown as finished, never started)."""
        super().__init__()
        self.views = {tid: TrialView(trial_id=tid, resolution=int(t.get("resolution", 0)),
                                     model=str(t.get("model", "")),
                                     total_epochs=int(t.get("total_epochs", 0)))
                      for tid, t in trials.items()}
        for tid in finished or []:
            if tid in self.views:
                v = self.views[tid]
                v.state, v.epoch = "finished", v.total_epochs
        self.slots = max(1, int(slots))
        self.interval = float(interval)
        self.out = out or sys.stdout
        self.epoch_lines = epoch_lines
        self.sweep_loc = sweep_loc
        if style == "auto":
            style = "table" if getattr(self.out, "isatty", lambda: False)() else "lines"
        self.style = style
        self._drawn = 0            # table lines on screen below the cursor's line start
        self._last_status = 0.0
        self._changed = True
        self.started = time.time()

    def __getstate__(self) -> dict:
        """Tune pickles its callbacks with the experiment state; a terminal stream does not pickle."""
        state = dict(self.__dict__)
        state["out"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.out = self.out or sys.stdout

    # --- numbers ----------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out = {"finished": 0, "running": 0, "pending": 0, "failed": 0}
        for v in self.views.values():
            key = "running" if v.state == "retrying" else v.state
            out[key] = out.get(key, 0) + 1
        return out

    def eta_seconds(self) -> float | None:
        """Remaining work / slots, from the finished-epoch durations seen so far (None: no data)."""
        all_secs = [s for v in self.views.values() for s in v.epoch_seconds]
        if not all_secs:
            return None
        overall = sum(all_secs) / len(all_secs)
        # seconds per epoch per pixel, for (model, resolution) kinds not seen yet: cost ~ pixels
        per_px = [s / v.resolution ** 2 for v in self.views.values() if v.resolution > 0
                  for s in v.epoch_seconds]
        px_rate = sum(per_px) / len(per_px) if per_px else None
        by_kind: dict[tuple, list[float]] = {}
        for v in self.views.values():
            by_kind.setdefault((v.model, v.resolution), []).extend(v.epoch_seconds)
        remaining = longest = 0.0
        for v in self.views.values():
            if v.state in ("finished", "failed"):
                continue
            left = max(0, v.total_epochs - v.epoch)
            kind = by_kind.get((v.model, v.resolution)) or []
            per_epoch = (sum(v.epoch_seconds) / len(v.epoch_seconds) if v.epoch_seconds
                         else sum(kind) / len(kind) if kind
                         else px_rate * v.resolution ** 2 if px_rate and v.resolution > 0
                         else overall)
            remaining += left * per_epoch
            longest = max(longest, left * per_epoch)
        # no faster than the longest remaining trial, which cannot be spread over slots
        return max(remaining / self.slots, longest)

    def summary_line(self) -> str:
        c = self.counts()
        return (f"{c['finished']}/{len(self.views)} finished, {c['running']} running, "
                f"{c['pending']} pending, {c['failed']} failed"
                f" | ETA {format_duration(self.eta_seconds())} ({self.slots} slots)")

    def running(self) -> list[TrialView]:
        return sorted((v for v in self.views.values() if v.state in ("running", "retrying")),
                      key=lambda v: v.trial_id)

    def table_text(self) -> str:
        """The summary and one row per running trial (the ``table`` style's block)."""
        rows = self.running()
        width = max([len(v.trial_id) for v in rows] + [5]) + 2
        lines = [self.summary_line(),
                 f"{'trial':<{width}}{'epoch':<7}{'train loss':<12}{'val AUROC':<11}{'img/s':>7}   ETA"]
        for v in rows[:TABLE_ROWS]:
            lines.append(f"{v.trial_id:<{width}}{f'{v.epoch}/{v.total_epochs}':<7}"
                         f"{_num(v.train_loss, '.4f'):<12}{_num(v.auroc, '.4f'):<11}"
                         f"{_num(v.images_per_s, ',.0f'):>7}   {format_duration(v.eta_seconds())}"
                         f"{'  (retry)' if v.state == 'retrying' else ''}")
        if len(rows) > TABLE_ROWS:
            lines.append(f"... and {len(rows) - TABLE_ROWS} more running")
        return "\n".join(lines)

    def status_text(self) -> str:
        """The ``lines`` style's status block: the summary and the running trials."""
        lines = [f"[{time.strftime('%H:%M:%S')}] {self.summary_line()}"]
        for v in self.running():
            best = _num(v.best_auroc, ".4f")
            lines.append(f"  {v.trial_id:<44} epoch {v.epoch}/{v.total_epochs}  best AUROC {best}"
                         f"  ETA {format_duration(v.eta_seconds())}"
                         f"{'  ' + v.where if v.where else ''}"
                         f"{'  (retry)' if v.state == 'retrying' else ''}")
        return "\n".join(lines)

    # --- output -------------------------------------------------------------------------------
    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _erase_table(self) -> None:
        if self._drawn:
            self._write(f"\x1b[{self._drawn}F\x1b[J")   # to the table's first line, clear below
            self._drawn = 0

    def _draw_table(self) -> None:
        self._erase_table()
        text = self.table_text()
        self._write(text + "\n")
        self._drawn = text.count("\n") + 1

    def _event(self, text: str, table_too: bool = True) -> None:
        """One line per event; in table style only starts, ends and failures scroll by."""
        line = f"[{time.strftime('%H:%M:%S')}] {text}\n"
        if self.style == "table":
            self._erase_table()
            if table_too:
                self._write(line)
            self._draw_table()
        else:
            self._write(line)
        self._changed = True

    def maybe_status(self, force: bool = False) -> None:
        if self.style == "table":
            if force or self._changed:
                self._draw_table()
                self._changed = False
            return
        now = time.time()
        if force or (self._changed and now - self._last_status >= self.interval):
            self._write(self.status_text() + "\n")
            self._last_status = now
            self._changed = False

    def close(self) -> None:
        """Leave the last table on screen and put the cursor below it."""
        if self.style == "table":
            self._draw_table()
            self._drawn = 0

    # --- events (plain methods, called by the Tune hooks below) --------------------------------
    def trial_started(self, trial_id: str, where: str = "") -> None:
        v = self.views.get(trial_id)
        if v is None:
            return
        retry = v.state == "retrying"
        v.state, v.where = "running", where
        self._event(f"{'restart' if retry else 'start'} {trial_id}{' on ' + where if where else ''}")

    def epoch_done(self, trial_id: str, record: dict) -> None:
        v = self.views.get(trial_id)
        if v is None:
            return
        v.state = "running"
        v.epoch = int(record.get("epoch", v.epoch + 1))
        secs = record.get("epoch_seconds")
        if isinstance(secs, (int, float)):
            v.epoch_seconds.append(float(secs))
        for key, attr in (("train_loss", "train_loss"), ("images_per_s", "images_per_s"),
                          ("auroc_mean", "auroc")):
            value = record.get(key)
            if isinstance(value, (int, float)) and value == value:   # not NaN
                setattr(v, attr, float(value))
                if key == "auroc_mean":
                    v.best_auroc = v.auroc if v.best_auroc is None else max(v.best_auroc, v.auroc)
        if self.epoch_lines:
            auroc = record.get("auroc_mean")
            self._event(f"{trial_id} epoch {v.epoch}/{v.total_epochs} AUROC "
                        f"{round(auroc, 4) if isinstance(auroc, float) else auroc}"
                        f" loss {_num(v.train_loss, '.4f')} {_num(v.images_per_s, ',.0f')} img/s"
                        f" ({format_duration(secs) if isinstance(secs, (int, float)) else '?'};"
                        f" ETA {format_duration(v.eta_seconds())})", table_too=False)
        self._changed = True

    def trial_finished(self, trial_id: str) -> None:
        v = self.views.get(trial_id)
        if v is None:
            return
        v.state, v.epoch = "finished", v.total_epochs
        best = f" best AUROC {v.best_auroc:.4f}" if v.best_auroc is not None else ""
        self._event(f"finished {trial_id}{best}")

    def trial_failed(self, trial_id: str, retrying: bool, error: str = "") -> None:
        v = self.views.get(trial_id)
        if v is None:
            return
        v.state = "retrying" if retrying else "failed"
        self._event(f"{'retrying' if retrying else 'FAILED'} {trial_id}{': ' + error if error else ''}")

    # --- Ray Tune hooks -----------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self.trial_started(_tid(trial))
        self.maybe_status()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.epoch_done(_tid(trial), result)
        self.maybe_status()

    def on_trial_complete(self, iteration, trials, trial, **info):
        # A deterministic error ends the trainable normally (so Tune does not retry it): the
        # ledger, written before it returned, says whether the trial really finished.
        if self._ledger_state(trial) == "failed":
            self.trial_failed(_tid(trial), retrying=False, error=self._error(trial))
        else:
            self.trial_finished(_tid(trial))
        self.maybe_status()

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.trial_failed(_tid(trial), retrying=True, error=self._error(trial))
        self.maybe_status()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.trial_failed(_tid(trial), retrying=False, error=self._error(trial))
        self.maybe_status()

    def _ledger_state(self, trial) -> str:
        if not self.sweep_loc:
            return ""
        from orchestrator import ledger
        try:
            return str((ledger.read_entry(self.sweep_loc, _tid(trial)) or {}).get("state") or "")
        except Exception:
            return ""

    def _error(self, trial) -> str:
        """The failing attempt's one-line error, from the ledger (written before the trial raised)."""
        if not self.sweep_loc:
            return ""
        from orchestrator import ledger
        try:
            entry = ledger.read_entry(self.sweep_loc, _tid(trial)) or {}
        except Exception:
            return ""
        return str(entry.get("error") or "")[:300]

    def on_step_end(self, iteration, trials, **info):
        self.maybe_status()

    def on_experiment_end(self, trials, **info):
        self.maybe_status(force=True)
