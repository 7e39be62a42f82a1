"""Measuring on a device: a wall-clock budget, the busy share, peak memory, JSON that survives a kill.

Shared by every section of the GPU check (bench/gpu_check.py); nothing here knows about models.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import resource
import sys
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np
import torch


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def error_text(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:400] if str(exc) else ''}{where}"


class Budget:
    """A global wall-clock budget; sections ask before starting and get 'skipped: budget'."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = time.monotonic()

    @property
    def used(self) -> float:
        return time.monotonic() - self.start

    @property
    def left(self) -> float:
        return self.seconds - self.used

    def allows(self, needed_s: float) -> bool:
        return self.left >= needed_s


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BusySampler:
    """Samples the device's busy share every ``interval`` s in a thread while active.

    CUDA: NVML ``utilization.gpu`` (percent of time a kernel was running over the driver's sample
    period). CPU: this process's CPU time over wall time x torch threads (the CPU 'device' busy
    share), so the tiny CPU mode reports a real number too.
    """

    def __init__(self, device: torch.device, interval: float = 0.1):
        self.device = device
        self.interval = interval
        self.samples: list[float] = []
        self.source = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read: Callable[[], float] | None = None
        self._cpu0 = self._wall0 = 0.0
        self.error = None
        if device.type == "cuda":
            try:
                self._read = self._nvml_reader()
                self._read()
                self.source = "nvml utilization.gpu, every 100 ms"
            except Exception as exc:  # no NVML: the section still reports images/s
                self._read = None
                self.error = f"NVML unavailable: {error_text(exc)}"
                self.source = "unavailable"
        else:
            self.source = "process cpu time / (wall x torch threads)"

    def _nvml_reader(self) -> Callable[[], float]:
        import pynvml
        pynvml.nvmlInit()
        index = torch.cuda.current_device() if self.device.index is None else self.device.index
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        if visible:
            entry = visible.split(",")[index].strip()
            handle = (pynvml.nvmlDeviceGetHandleByUUID(entry) if not entry.isdigit()
                      else pynvml.nvmlDeviceGetHandleByIndex(int(entry)))
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.samples.append(self._read())

    def __enter__(self) -> "BusySampler":
        self.samples = []
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()
        if self._read is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self.device.type != "cuda":
            wall = time.perf_counter() - self._wall0
            cpu = time.process_time() - self._cpu0
            self.samples = [min(1.0, cpu / max(1e-9, wall * torch.get_num_threads()))]

    def result(self) -> dict:
        share = float(np.mean(self.samples)) if self.samples else None
        out = {"busy_share": share, "busy_samples": len(self.samples), "busy_source": self.source}
        if self.error:
            out["busy_error"] = self.error
        return out


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
                "memory_source": "torch.cuda.max_memory_allocated/_reserved"}
    # CPU: the process's peak resident set (kilobytes on Linux): an upper bound of the step's need.
    return {"peak_memory_allocated_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
            "peak_memory_reserved_bytes": None, "memory_source": "ru_maxrss of the process (cpu)"}


def write_json(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def log(msg: str) -> None:
    """A progress line on stderr, and in $OUT/gpu_check.log where the device tool brings $OUT back
    (so a run killed at its time limit still leaves its log)."""
    line = f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}"
    print(line, file=sys.stderr, flush=True)
    if os.environ.get("OUT"):
        with contextlib.suppress(OSError), open(os.path.join(os.environ["OUT"], "gpu_check.log"), "a") as f:
            f.write(line + "\n")


def section_env(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cpu_count": cpu_count(), "device": str(device),
           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"device_name": torch.cuda.get_device_name(device),
                    "device_memory_bytes": int(props.total_memory),
                    "multiprocessors": int(props.multi_processor_count),
                    "capability": f"{props.major}.{props.minor}"})
        with contextlib.suppress(Exception):
            import pynvml
            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
    else:
        env["device_name"] = f"cpu ({platform.processor() or platform.machine()})"
        env["torch_threads"] = torch.get_num_threads()
    for mod in ("torchvision", "efficientnet_pytorch", "ray", "pyarrow"):
        try:
            env[f"{mod}_version"] = getattr(__import__(mod), "__version__", "?")
        except Exception as exc:
            env[f"{mod}_version"] = None
            env[f"{mod}_error"] = error_text(exc)
    return env
