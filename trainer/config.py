"""Every setting of one trial in one typed, commented dataclass (defaults = ../shared/PROTOCOL.md).

Precedence: the defaults below < a config file (JSON or YAML, ``--config``) < command-line flags.
``TrainConfig.from_dict`` rejects unknown keys and values of the wrong type, so a typo in a sweep
file fails loudly instead of silently training the default.

``result_fields()`` names the fields that change a trial's result; the trial id hashes exactly those
(plus the store's manifest hash, which the caller supplies), so moving the store, changing the number
of loader workers or the weight cache location never invalidates finished trials.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from common.cli import UserError
from common.schema import TASKS, task_key


class ConfigError(UserError):
    """A configuration value or key is invalid (printed as one line by the CLIs)."""


@dataclass
class TrainConfig:
    # --- what is trained --------------------------------------------------------------------
    store: str = ""                      # store location (local/shared path or s3://...)
    model: str = "resnet50"              # trainer.models name; 'efficientnet' = matched to resolution
    resolution: int = 320                # store resolution to read (pixels, square)
    task_mode: str = "multi"             # 'multi': one output per task, masked loss; 'single': one task
    task: str = ""                       # the task in single mode (e.g. 'Cardiomegaly'); '' in multi
    tasks: tuple[str, ...] = TASKS       # tasks of a multi-task model, report order
    seed: int = 0                        # drives head init, dropout and augmentation
    weights: str = "imagenet"            # 'imagenet', 'none' or a path to a state_dict file
    weights_dir: str = ""                # local cache of ImageNet weights ('' = trainer.weights default)

    # --- schedule (PROTOCOL.md "Training") -------------------------------------------------
    epochs_frozen: int = 1               # stage 1: body frozen (its BatchNorm still trains)
    epochs_unfrozen: int = 5             # stage 2: everything trains
    lr_frozen: float = 5e-3              # stage-1 one-cycle max LR (head + body BatchNorm)
    lr_body: float = 2.5e-5              # stage-2 one-cycle max LR of the body
    lr_head: float = 2.5e-3              # stage-2 one-cycle max LR of the head
    onecycle_pct_start: float = 0.25     # share of steps spent warming up (fastai's default)
    onecycle_div: float = 25.0           # initial LR = max LR / div (fastai's default)
    onecycle_final_div: float = 1e5      # final LR = max LR / final_div (fastai's default)
    weight_decay: float = 0.1            # decoupled (AdamW) weight decay
    betas: tuple[float, float] = (0.9, 0.99)  # Adam betas
    batch_studies: int = 40              # studies per batch (1-3 images each)
    shuffle: bool = False                # PROTOCOL.md: no shuffling (if on: keyed by seed and epoch)

    # --- augmentation (training only; PROTOCOL.md "Preprocessing") -----------------------------
    augment: bool = True                 # off: training sees the stored pixels as validation does
    aug_p_geometric: float = 0.75        # probability an image gets the geometric transform
    aug_p_intensity: float = 0.75        # probability an image gets the brightness/contrast change
    aug_rotation_deg: float = 30.0       # rotation uniform in [-deg, +deg]
    aug_brightness: float = 0.2          # additive shift uniform in [-b, +b] (intensities in [0, 1])
    aug_contrast: float = 0.2            # contrast factor uniform in [1 - c, 1 + c] around the mean
    aug_zoom_out: float = 0.2            # shrink by up to 1/(1 + z), black pixels padding the border
    aug_perspective: float = 0.1         # each corner moves up to this share of the half-width

    # --- data subsets (smoke runs, the demo budget) ---------------------------------------------
    max_train_studies: int = 0           # 0 = all; else the first N studies in store order
    max_valid_studies: int = 0           # 0 = all

    # --- execution (do not change the result on a given device) ---------------------------------
    device: str = "auto"                 # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...
    amp: str = "auto"                    # 'auto' (bf16 on CUDA, off on CPU), 'bf16', 'off'
    channels_last: str = "auto"          # 'auto' (on for CUDA), 'on', 'off'
    workers: int = -1                    # loader worker processes; -1 = auto, 0 = in-process
    cuda_graphs: str = "auto"            # replay forward+backward as CUDA graphs: 'auto' (CUDA at <= 320 px), 'on', 'off'
    compile: str = "auto"                # torch.compile (inductor) the model: 'auto' (CUDA at >= 400 px), 'on', 'off'
    cache_dir: str = ""                  # node-local store cache dir (preprocessing/cache.py); "" = read the store directly

    # --- validation ---------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.task_mode not in ("multi", "single"):
            raise ConfigError(f"task_mode: {self.task_mode!r} is not 'multi' or 'single'")
        if self.task_mode == "single":
            if not self.task:
                raise ConfigError("task: single task mode needs a task, e.g. --task Cardiomegaly")
            if self.task not in TASKS:
                raise ConfigError(f"task: {self.task!r} is not one of {', '.join(TASKS)}")
        elif self.task:
            raise ConfigError("task: only used with --task-mode single")
        if not self.tasks:
            raise ConfigError("tasks: at least one task is needed")
        for t in self.tasks:
            if t not in TASKS:
                raise ConfigError(f"tasks: {t!r} is not one of {', '.join(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError("tasks: duplicate task")
        for name in ("resolution", "batch_studies"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("epochs_frozen", "epochs_unfrozen", "max_train_studies", "max_valid_studies"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.epochs_frozen + self.epochs_unfrozen == 0:
            raise ConfigError("epochs_frozen + epochs_unfrozen: at least one epoch is needed")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: need two values in [0, 1), got {self.betas}")
        for name in ("lr_frozen", "lr_body", "lr_head", "onecycle_div", "onecycle_final_div"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if not 0 < self.onecycle_pct_start < 1:
            raise ConfigError(f"onecycle_pct_start: must be in (0, 1), got {self.onecycle_pct_start}")
        for name in ("aug_p_geometric", "aug_p_intensity"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}: must be a probability, got {getattr(self, name)}")
        for name in ("aug_rotation_deg", "aug_brightness", "aug_contrast", "aug_zoom_out",
                     "aug_perspective", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.aug_contrast >= 1:
            raise ConfigError(f"aug_contrast: must be < 1, got {self.aug_contrast}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ConfigError(f"amp: {self.amp!r} is not 'auto', 'bf16' or 'off'")
        if self.channels_last not in ("auto", "on", "off"):
            raise ConfigError(f"channels_last: {self.channels_last!r} is not 'auto', 'on' or 'off'")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: {self.device!r} is not 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise ConfigError(f"cuda_graphs: {self.cuda_graphs!r} is not 'auto', 'on' or 'off'")
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"compile: {self.compile!r} is not 'auto', 'on' or 'off'")
        if self.workers < -1:
            raise ConfigError(f"workers: must be -1 (auto) or >= 0, got {self.workers}")

    # --- derived values ---------------------------------------------------------------------------
    @property
    def trained_tasks(self) -> tuple[str, ...]:
        """The model's outputs, in order: all tasks in multi mode, the one task in single mode."""
        return (self.task,) if self.task_mode == "single" else tuple(self.tasks)

    @property
    def total_epochs(self) -> int:
        return self.epochs_frozen + self.epochs_unfrozen

    def stage(self, epoch: int) -> str:
        """'frozen' or 'unfrozen' for a 1-based epoch."""
        return "frozen" if epoch <= self.epochs_frozen else "unfrozen"

    # --- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: "TrainConfig | None" = None) -> "TrainConfig":
        """A config from a mapping; keys not given keep ``base``'s (default: the defaults')."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a mapping of field -> value, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)} "
                              f"(known: {', '.join(known)})")
        values = (base or cls()).to_dict()
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            values[key] = _coerce(key, value, hints[key])
        for key, value in values.items():
            values[key] = _coerce(key, value, hints[key])
        return cls(**values)

    @classmethod
    def from_file(cls, location: str, base: "TrainConfig | None" = None) -> "TrainConfig":
        """A JSON or YAML config file (by extension; JSON is also valid YAML)."""
        from common import storage
        try:
            text = storage.read_bytes(location).decode("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {location} does not exist") from None
        try:
            if str(location).endswith(".json"):
                data = json.loads(text)
            else:
                import yaml
                data = yaml.safe_load(text)
        except Exception as exc:
            raise ConfigError(f"config file {location} is not valid JSON/YAML: {exc}") from None
        return cls.from_dict(data or {}, base=base)

    # --- identity ---------------------------------------------------------------------------------
    @staticmethod
    def result_fields() -> tuple[str, ...]:
        """Fields that change the trial's result; the trial id hashes these.

        Excluded: where the store lives (its content is covered by the manifest hash), the weight
        cache location (its content is covered by ``weights``), loader workers (results do not
        depend on them), CUDA graphs (the same kernels, replayed), compilation (the same maths,
        fused; equal within a tolerance, trainer/compile.py) and the node-local cache folder.
        Device, amp and channels_last stay in: a bf16 GPU run is not the same experiment as an
        fp32 CPU run.
        """
        excluded = {"store", "weights_dir", "workers", "cache_dir", "cuda_graphs", "compile"}
        return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in excluded)

    def result_dict(self) -> dict[str, Any]:
        d = self.to_dict()
        return {k: d[k] for k in self.result_fields()}

    def result_hash(self, manifest_hash: str) -> str:
        """sha256 (hex) of the result-determining fields and the store's manifest hash."""
        payload = json.dumps({"config": self.result_dict(), "manifest_hash": manifest_hash},
                             sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    def trial_id(self, manifest_hash: str) -> str:
        """``r{res}-{model}-s{seed}-{mode}[-{task_key}]-{hash10}`` (docs/architecture.md)."""
        parts = [f"r{self.resolution}", self.model, f"s{self.seed}", self.task_mode]
        if self.task_mode == "single":
            parts.append(task_key(self.task))
        parts.append(self.result_hash(manifest_hash)[:10])
        return "-".join(parts)


def field_help() -> dict[str, str]:
    """{field: its comment in the TrainConfig source} (the --help text of every flag)."""
    import inspect
    import re
    out = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type; lists become tuples; ints are accepted as floats."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, v, args[0]) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '5e-3' as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {hint} for {key}")  # a bug in this file
