"""torch.compile (inductor) of the model for a trial: TrainConfig.compile = 'auto' | 'on' | 'off'.

Why: at 400-480 px a step is compute- and memory-bound, not launch-bound (CUDA graphs gained at
most 1.01x there, trainer/graphs.py), and most of its time outside the convolutions goes to
elementwise work that eager PyTorch runs as separate kernels, each reading and writing the whole
activation: DenseNet's BatchNorm-ReLU before every concatenation, EfficientNet's BatchNorm, SiLU,
squeeze-excitation gating and the depthwise convolutions' neighbours. Inductor fuses those chains
into a few generated kernels and keeps fewer intermediate activations for the backward.

How: ``model.compile()`` compiles the module in place. Its ``state_dict`` keys stay those of the
plain model (``torch.compile(model)`` would add an ``_orig_mod.`` prefix), so checkpoints, resume,
the best-epoch weights and Grad-CAM do not know compilation happened. The forward and, through
AOTAutograd, the backward are compiled; the loss, the optimizer and the schedule stay eager (a few
dozen kernels). The first batch shape compiles a static graph and the second a graph with a
symbolic image count, so the varying number of images per batch (40 studies of 1-3 images) costs
two compilations, plus one per stage (freezing changes which parameters need gradients) and one for
validation (eval mode, no gradients).

Together with CUDA graphs: inductor's own CUDA graphs (mode 'reduce-overhead') are left off and the
trainer's GraphedTraining captures the compiled forward and backward instead, one graph per batch
shape, as it captures the eager ones. That keeps one capture path, the one whose BatchNorm-statistics
and dropout-RNG restoration is checked against eager (bench/gpu/equivalence.py), instead of a second
one with its own rules for buffers that the training step mutates. Mode 'max-autotune-no-cudagraphs'
would tune convolution and matmul templates per shape; its compile time (minutes per shape and
model) does not fit the GPU check's budget, so ``MODE`` stays inductor's default until measured.

Trust: on CPU 'auto' is off, so CPU runs stay bitwise reproducible. With compile on, losses and
weights match eager within a tolerance, not bitwise (fused kernels sum in another order):
tests/test_compile.py on CPU, the GPU check's ``equivalence`` section on CUDA. Like ``cuda_graphs``,
``compile`` is left out of the trial id.
"""
from __future__ import annotations

import torch
import torch._inductor.config

from trainer.graphs import AUTO_MAX_RESOLUTION as GRAPHS_AUTO_MAX_RESOLUTION

#: Where compiling should pay: on CUDA above the resolutions where CUDA graphs are on by default,
#: where the step is compute-bound (graphs gained <= 1.01x at 480 px on an H100,
#: docs/benchmarks.md), which is what fusion speeds up. The GPU check compiles these groups.
COMPILE_MIN_RESOLUTION = GRAPHS_AUTO_MAX_RESOLUTION + 1
#: 'auto' compiles nowhere until the GPU check has shown, on a GPU, that a compiled trial is faster
#: and trains the same model as eager: a default no GPU has run would put every large-image trial
#: at risk. Then this becomes the measured set of (resolution) where it pays.
AUTO_COMPILES = False
#: inductor's mode (see the module docstring for why not 'reduce-overhead' or 'max-autotune').
MODE = "default"
SETTINGS = ("auto", "on", "off")


def want_compile(setting: str, device: torch.device, resolution: int) -> bool:
    """TrainConfig.compile ('auto', 'on', 'off') -> compile the model on this device?"""
    if setting not in SETTINGS:
        raise ValueError(f"compile: {setting!r} is not one of {', '.join(SETTINGS)}")
    if setting != "auto":
        return setting == "on"
    return AUTO_COMPILES and device.type == "cuda" and resolution >= COMPILE_MIN_RESOLUTION


def compile_model(model: torch.nn.Module, mode: str = MODE) -> torch.nn.Module:
    """Compile ``model`` in place (its parameters, buffers and state_dict keys unchanged) and return it.

    ``dynamic=None`` is torch's automatic dynamic shapes: a dimension that changes between calls
    (the batch's image count) is recompiled once as symbolic instead of once per value.
    """
    # Dropout in compiled code would otherwise draw from inductor's own generator: other masks
    # than eager's for the same seed, so a compiled trial would not be the same experiment (the
    # head's two dropout layers made a 33% loss difference after two steps). With fallback_random
    # the compiled graph calls torch's RNG as eager does; the head's dropout is cheap either way.
    torch._inductor.config.fallback_random = True
    model.compile(mode=mode, dynamic=None, fullgraph=False)
    return model


def is_compiled(model: torch.nn.Module) -> bool:
    return getattr(model, "_compiled_call_impl", None) is not None
