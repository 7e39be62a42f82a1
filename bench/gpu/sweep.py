"""The GPU check's process-level sections: a two-trial mini sweep with real GPU pinning, and the
packing probe (two processes stepping at once on one GPU against one alone).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from bench.gpu.measure import Budget, clean, error_text, peak_memory
from bench.gpu.trial import BATCH, Trial, repeat, synthetic_batch
from common.sweep_folder import SweepFolder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def setup_device(args) -> torch.device:
    """--device resolved (auto: cuda if available), with cuDNN autotuning as --cudnn-benchmark says."""
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    return device


def section_mini_sweep(args, store: dict | None, device: torch.device, workdir: str) -> dict:
    """Two tiny trials through ``python -m orchestrator.sweep`` on a local Ray instance."""
    # On a CPU machine the local Ray gets one fake GPU (--num-gpus 1): the pinning path is the same
    # (Ray sets CUDA_VISIBLE_DEVICES per trial), only torch then finds no CUDA device and trains on CPU.
    fake_gpu = device.type != "cuda"
    out: dict[str, Any] = {"resolution": args.sweep_resolution, "model": "resnet18", "seeds": [0, 1],
                           "gpus_per_trial": args.sweep_gpus_per_trial, "fake_gpu": fake_gpu}
    try:
        import ray
        out["ray_version"] = ray.__version__
    except Exception as exc:
        out["error"] = f"ray cannot be imported: {error_text(exc)}"
        return out
    if store is None or "location" not in store:
        out["error"] = "no phantom store (see the 'store' section)"
        return out
    storage_dir = os.path.join(workdir, "sweeps")
    cmd = [sys.executable, "-m", "orchestrator.sweep", "--store", store["location"],
           "--storage", storage_dir, "--name", "gpucheck", "--resolutions", str(args.sweep_resolution),
           "--models", "resnet18", "--seeds", "0,1", "--weights", "none",
           "--epochs-frozen", "0", "--epochs-unfrozen", "1", "--max-train-studies", str(args.sweep_studies),
           "--max-valid-studies", str(args.sweep_studies), "--cpus-per-trial", "1",
           "--gpus-per-trial", str(args.sweep_gpus_per_trial), "--no-aggregate", "--no-verify-store",
           "--progress-interval", "5"]
    if fake_gpu:
        cmd += ["--num-gpus", "1", "--workers", "0"]
    out["command"] = " ".join(cmd[1:])
    # Ray's sockets live below the run dir and a socket path may not exceed 107 bytes: keep the
    # parent short (CXR_RAY_DIR if the caller chose one, else a fresh folder directly in /tmp).
    ray_parent = os.environ.get("CXR_RAY_DIR") or tempfile.mkdtemp(prefix="gck-", dir="/tmp")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", CXR_RAY_DIR=ray_parent,
               PYTHONPATH=os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    os.makedirs(ray_parent, exist_ok=True)
    try:
        return _run_sweep(args, cmd, env, out, storage_dir)
    finally:
        if not os.environ.get("CXR_RAY_DIR"):
            shutil.rmtree(ray_parent, ignore_errors=True)


def _run_sweep(args, cmd: list[str], env: dict, out: dict, storage_dir: str) -> dict:
    t0 = time.perf_counter()
    # Its own process group: on a timeout the driver gets SIGINT first (the sweep then stops the
    # Ray instance it started), and only if that does not end it, the group gets SIGKILL.
    if args.tiny:   # one torch thread per trial: a small shared CI box is oversubscribed otherwise
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    output = ""
    try:
        output, _ = proc.communicate(timeout=args.sweep_timeout_s)
        out["returncode"] = proc.returncode
    except BaseException as exc:   # a timeout here, or this check being stopped (SIGTERM)
        if not isinstance(exc, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            raise
        out["returncode"] = None
        out["error"] = f"timed out after {args.sweep_timeout_s:.0f} s"
        import signal
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
    out["output_tail"] = (output or "")[-1500:]
    out["seconds"] = time.perf_counter() - t0
    out["trials"] = _sweep_trials(os.path.join(storage_dir, "gpucheck"))
    finished = [t for t in out["trials"] if t.get("state") == "finished"]
    out["trials_finished"] = len(finished)
    out["all_on_gpu"] = bool(finished) and all(str(t.get("device", "")).startswith("cuda") for t in finished)
    out["concurrent"] = _overlap(out["trials"])
    if out.get("returncode") not in (0, None) and "error" not in out:
        out["error"] = f"sweep exited {out['returncode']}"
    return out


def _sweep_trials(sweep_dir: str) -> list[dict]:
    """Per trial: ledger state and placement, and the device/timing of its result record."""
    folder = SweepFolder(sweep_dir)
    if not os.path.isdir(folder.ledger_dir):
        return []
    trials = []
    for tid in folder.ledger_ids_on_storage():
        with open(folder.ledger_entry(tid)) as f:
            entry = json.load(f)
        rec = {"trial_id": tid, "state": entry.get("state")}
        for key in ("cuda_visible_devices", "gpu_ids", "node", "started", "ended", "error",
                    "attempts"):
            if key in entry:
                rec[key] = entry[key]
        for key, value in entry.items():   # placement may be nested under 'placement'/'runs'
            if isinstance(value, dict) and "cuda_visible_devices" in value and "cuda_visible_devices" not in rec:
                rec["cuda_visible_devices"] = value["cuda_visible_devices"]
        trial = folder.trial(tid)
        if trial.is_finished():
            result = trial.read_result()
            rec["device"] = result.get("device")
            rec["images_per_s"] = result.get("images_per_s")
            rec["peak_memory_bytes"] = result.get("peak_memory_bytes")
            rec["trial_seconds"] = result.get("seconds")
            rec["best_auroc_mean"] = max((h.get("auroc_mean") or 0) for h in result.get("history", [{}]))
        if os.path.exists(trial.log_path):   # the trainer logs its CUDA-graph use per epoch
            with open(trial.log_path) as f:
                rec["cuda_graph_log"] = [line.strip() for line in f if "CUDA graphs" in line][-3:]
        trials.append(rec)
    return trials


def _overlap(trials: list[dict]) -> bool | None:
    """Whether the trials' running intervals overlapped (needs ISO start/finish in the ledger)."""
    spans = []
    for t in trials:
        try:
            spans.append((_dt.datetime.fromisoformat(str(t["started"])),
                          _dt.datetime.fromisoformat(str(t["ended"]))))
        except Exception:
            return None
    if len(spans) < 2:
        return None
    spans.sort()
    return any(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1))


def section_packing_probe(args, device: torch.device, single_rate: float | None,
                          budget: Budget) -> dict:
    """N processes stepping the same small trial at once on one device, timed over one shared
    wall-clock window: their summed images/s against one process alone."""
    name, res = args.probe_model, args.probe_resolution
    n = args.probe_processes
    start_at = time.time() + args.probe_startup_s
    cmd = [sys.executable, "-m", "bench.gpu_check", "--probe-child", f"{name}@{res}",
           *(["--tiny"] if args.tiny else []), "--min-steps", str(args.min_steps),
           "--device", device.type, "--start-at", str(start_at), "--seconds", str(args.seconds),
           "--warmup-steps", str(args.warmup_steps),
           "--cudnn-benchmark" if args.cudnn_benchmark else "--no-cudnn-benchmark"]
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=REPO) for _ in range(n)]
    children = []
    deadline = time.monotonic() + max(30.0, min(args.probe_timeout_s, budget.left - 5))
    for p in procs:
        try:
            so, se = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        try:
            children.append(json.loads(so.strip().splitlines()[-1]))
        except Exception:
            children.append({"error": f"exit {p.returncode}: {(se or so)[-600:]}"})
    from trainer.graphs import want_graphs
    out: dict[str, Any] = {"model": name, "resolution": res, "processes": n,
                           "cuda_graphs": want_graphs("auto", device, res), "children": children}
    ok = [c for c in children if "images_per_s" in c]
    if len(ok) == n:
        total = sum(c["images_per_s"] for c in ok)
        out["packed_images_per_s"] = total
        out["single_images_per_s"] = single_rate
        if single_rate:
            out["packing_gain"] = total / single_rate
        out["all_started_together"] = not any(c.get("late") for c in ok)
    else:
        out["error"] = "a probe process failed (see children)"
    return out


def probe_child(args) -> int:
    """One packing-probe process: build, warm up, wait for the shared start, step for --seconds."""
    device = setup_device(args)
    name, res = args.probe_child.split("@")
    res = int(res)
    cuda = device.type == "cuda"
    from trainer.graphs import want_graphs
    trial = Trial(name, res, device, amp=cuda, channels_last=cuda,
                  graphs=want_graphs("auto", device, res))   # as a sweep trial runs it
    source = repeat(synthetic_batch(res, device))
    trial.run(source, args.warmup_steps)
    calib = max(1, args.min_steps // 2)
    t0 = time.perf_counter()
    trial.run(source, calib)
    steps = max(args.min_steps, int(args.seconds / ((time.perf_counter() - t0) / calib)))
    late = time.time() > args.start_at
    while time.time() < args.start_at:
        time.sleep(0.005)
    start = time.perf_counter()
    trial.run(source, steps)
    elapsed = time.perf_counter() - start
    out = {"images_per_s": steps * BATCH["images"] / elapsed, "steps": steps, "late": late}
    out.update(peak_memory(device))
    print(json.dumps(clean(out)))
    return 0
