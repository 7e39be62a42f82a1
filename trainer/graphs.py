"""CUDA graphs of the model's forward and backward, one per batch shape (issue 7).

Why: at 160 px a 40-study step is too small to fill a Hopper GPU. The H200 check measured
ResNet50 busy only 38% of a 28 ms step (docs/benchmarks.md). The time went to launching ~1,000
kernels from Python one by one. A CUDA graph replays the whole forward, and then the whole
backward, with one launch each. The loss, optimizer and schedule stay eager: they are a few dozen
kernels, and the one-cycle schedule changes learning rates as Python floats.

A batch holds 40 studies of 1-3 images, so its image count N varies from step to step. We keep one
graph per input shape, captured the first time that shape is seen. All graphs share one memory
pool. That is safe because every step replays its forward and then its backward before the next
step begins, so no graph's scratch memory (its activations) is still needed when another graph
runs. Each graph also keeps its own parameter-gradient outputs and input buffer, about the
parameters' fp32 size. ``max_graphs`` caps that memory; shapes beyond the cap run eagerly and are
counted.

Capturing runs a few warm-up passes in training mode. Those passes would move the BatchNorm
running statistics and draw dropout masks, so we save both (the buffers and the RNG states) and
put them back after capture; the model then trains as if the capture never happened.
"""
from __future__ import annotations

import inspect
import time

import torch

#: 'auto' turns graphs on at or below this resolution on CUDA. Measured on an H100 (docs/benchmarks.md,
#: 2026-11-26): graphs gave 1.7-2.5x at 160 px, 1.2-2.0x at 240 px, 1.01-1.4x at 320 px (ResNet50,
#: DenseNet121, EfficientNet-B0), and at most 1.01x at 480 px, where they only cost memory.
AUTO_MAX_RESOLUTION = 320
#: Default cap on graphs per training stage. Each graph keeps its own fp32 parameter gradients
#: (ResNet50: ~100 MB), so 24 graphs cost ~2.4 GB. 40 CheXpert studies (1.19 images each on average,
#: sd ~0.4) make 48 +- 3 images, so 24 shapes cover nearly every batch; the rest run eagerly.
MAX_GRAPHS = 24


def want_graphs(setting: str, device: torch.device, resolution: int) -> bool:
    """TrainConfig.cuda_graphs ('auto', 'on', 'off') -> use graphs on this device?"""
    if device.type != "cuda" or setting == "off":
        return False
    return setting == "on" or resolution <= AUTO_MAX_RESOLUTION


def _supported(fn, **kwargs) -> dict:
    """The keyword arguments ``fn`` accepts. Older torch releases lack ``pool`` (each graph then
    gets its own pool: more memory, same results) and ``capture_error_mode``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in kwargs.items() if k in params}


class _RngState:
    """torch's CPU and current-CUDA-device generator states, to undo the warm-up passes' draws."""

    def __init__(self, cpu: torch.Tensor, cuda: torch.Tensor | None):
        self.cpu, self.cuda = cpu, cuda

    @classmethod
    def save(cls) -> "_RngState":
        return cls(torch.get_rng_state(),
                   torch.cuda.get_rng_state() if torch.cuda.is_available() else None)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


class _Call(torch.nn.Module):
    """A wrapper that make_graphed_callables may rewrite. It replaces the ``forward`` of the module it
    is given, and the real model must keep its own forward (for eval, for Grad-CAM, for pickling)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class GraphedTraining:
    """``graphs(x)`` in place of ``model(x)`` in the training step, on CUDA, in training mode.

    Make a new instance when parameters are frozen or unfrozen: a graph's backward is captured for
    one set of trainable parameters.
    """

    def __init__(self, model: torch.nn.Module, *, bf16: bool, stage: str = "",
                 max_graphs: int = MAX_GRAPHS, warmup_iters: int = 3):
        self.model, self.bf16, self.stage = model, bf16, stage   # stage: the one it was captured for
        self.max_graphs, self.warmup_iters = max_graphs, warmup_iters
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, torch.nn.Module] = {}
        self.captured_s = 0.0     # wall seconds spent capturing
        self.eager_steps = 0      # steps whose shape was past the cap
        self.graphed_steps = 0
        # Which parameters train: a graph's backward is captured for this set.
        self._trainable = tuple(p.requires_grad for p in model.parameters())
        # The capture's warm-up passes run on a side stream and leave the parameters' gradient
        # accumulators tied to it, so every replayed backward triggers torch's "AccumulateGrad
        # node's stream does not match" warning. The extra stream wait it warns about costs nothing
        # measurable: the H100 stayed 92-93% busy at 160 px with graphs.
        quiet = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
        if quiet is not None:
            quiet(False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.model.training:   # graphs hold training-mode kernels (BatchNorm batch stats)
            return self.model(x)
        if tuple(p.requires_grad for p in self.model.parameters()) != self._trainable:
            raise RuntimeError("GraphedTraining: parameters were frozen or unfrozen after capture; "
                               "make a new GraphedTraining for the new stage")
        key = (tuple(x.shape), x.stride(), x.dtype)
        graphed = self.graphs.get(key)
        if graphed is None:
            if len(self.graphs) >= self.max_graphs:
                self.eager_steps += 1
                return self.model(x)
            graphed = self._capture(x)
            self.graphs[key] = graphed
        self.graphed_steps += 1
        return graphed(x)

    def _capture(self, x: torch.Tensor) -> torch.nn.Module:
        t0 = time.perf_counter()
        buffers = list(self.model.buffers())
        saved = [b.detach().clone() for b in buffers]
        rng = _RngState.save()
        call = _Call(self.model)
        # The capture must not use autocast's weight cache (make_graphed_callables refuses it);
        # autocast itself is on, so the graph holds the same bf16 kernels an eager step runs.
        # thread_local: the DataLoader's pin-memory thread may allocate pinned memory meanwhile.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            graphed = torch.cuda.make_graphed_callables(
                call, (x.detach().clone(),), num_warmup_iters=self.warmup_iters,
                **_supported(torch.cuda.make_graphed_callables,
                             pool=self.pool, capture_error_mode="thread_local"))
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
        rng.restore()   # the warm-up passes' dropout draws leave no trace either
        self.captured_s += time.perf_counter() - t0
        return graphed

    def stats(self) -> dict:
        return {"graphs": len(self.graphs), "graphed_steps": self.graphed_steps,
                "eager_steps": self.eager_steps, "capture_s": round(self.captured_s, 3)}
