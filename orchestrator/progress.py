"""A plain-text, low-noise live view of a sweep (replaces Ray Tune's own table, run with verbose=0).

One line per event (trial started, epoch done, finished, failed, retried) and a status block
when something changed and at most every ``interval`` seconds:

    [01:02:03] 12/50 finished, 4 running, 33 pending, 1 failed | ETA 3h05m (4 slots)
      r320-resnet50-s0-multi-1a2b3c4d5e   epoch 3/6  best AUROC 0.8123  node 10.0.0.7 gpu 1

The ETA is the remaining epochs of every unfinished trial times an epoch duration (the trial's own
mean when it has finished an epoch, else the mean of trials with the same model and resolution,
else the observed seconds per pixel scaled to its resolution), divided by the number of trial
slots. It is a rough guide: it ignores that models differ in cost at the same resolution until a
trial of that model has finished an epoch.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import IO

from ray.tune.progress_reporter import TrialProgressCallback


@dataclass
class TrialView:
    trial_id: str
    resolution: int = 0
    model: str = ""
    total_epochs: int = 0
    state: str = "pending"       # pending | running | finished | failed | retrying
    epoch: int = 0
    best_auroc: float | None = None
    epoch_seconds: list[float] = field(default_factory=list)
    where: str = ""


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


def _tid(trial) -> str:
    return str(trial.config.get("trial", trial.config).get("trial_id", ""))


class SweepProgress(TrialProgressCallback):
    """Tune callback printing the sweep's progress; also usable without Tune (call the on_* methods).

    It subclasses Tune's TrialProgressCallback only so that Tune does not add its own one, which
    prints "Trial ... completed. Last result: ..." even at verbose=0; every hook is overridden.
    """

    def __init__(self, trials: dict[str, dict], finished: list[str] | None = None,
                 slots: int = 1, interval: float = 30.0, out: IO[str] | None = None,
                 epoch_lines: bool = True, sweep_loc: str | None = None):
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
        self._last_status = 0.0
        self._changed = True
        self.started = time.time()

    # --- output -------------------------------------------------------------------------------
    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _event(self, text: str) -> None:
        self._print(f"[{time.strftime('%H:%M:%S')}] {text}")
        self._changed = True

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

    def status_text(self) -> str:
        c = self.counts()
        total = len(self.views)
        lines = [f"[{time.strftime('%H:%M:%S')}] {c['finished']}/{total} finished, "
                 f"{c['running']} running, {c['pending']} pending, {c['failed']} failed"
                 f" | ETA {format_duration(self.eta_seconds())} ({self.slots} slots)"]
        for v in sorted(self.views.values(), key=lambda v: v.trial_id):
            if v.state in ("running", "retrying"):
                best = f"{v.best_auroc:.4f}" if v.best_auroc is not None else "-"
                lines.append(f"  {v.trial_id:<44} epoch {v.epoch}/{v.total_epochs}  best AUROC {best}"
                             f"{'  ' + v.where if v.where else ''}"
                             f"{'  (retry)' if v.state == 'retrying' else ''}")
        return "\n".join(lines)

    def maybe_status(self, force: bool = False) -> None:
        now = time.time()
        if force or (self._changed and now - self._last_status >= self.interval):
            self._print(self.status_text())
            self._last_status = now
            self._changed = False

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
        auroc = record.get("auroc_mean")
        if isinstance(auroc, (int, float)) and auroc == auroc:   # not NaN
            v.best_auroc = auroc if v.best_auroc is None else max(v.best_auroc, auroc)
        if self.epoch_lines:
            self._event(f"{trial_id} epoch {v.epoch}/{v.total_epochs} AUROC "
                        f"{auroc if not isinstance(auroc, float) else round(auroc, 4)}"
                        f" ({format_duration(secs) if isinstance(secs, (int, float)) else '?'})")
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
        self.trial_finished(_tid(trial))
        self.maybe_status()

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.trial_failed(_tid(trial), retrying=True, error=self._error(trial))
        self.maybe_status()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.trial_failed(_tid(trial), retrying=False, error=self._error(trial))
        self.maybe_status()

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


