"""Every setting of one trial in one typed dataclass; each field carries its help in its metadata.

Precedence: the defaults below < a config file (JSON or YAML, ``--config``) < command-line flags.
``TrainConfig.from_dict`` rejects unknown keys and values of the wrong type, so a typo in a sweep
file fails loudly instead of silently training the default.

Construction normalises and validates, once: the resolution limit is trainer.models'
``MIN_RESOLUTION``, the ``efficientnet`` alias becomes the variant for the resolution (so one trial
has one id whichever command makes it), task names must be non-empty and unique (whether the store
has them is checked when the trial opens it).

The recipe: ``recipe="fastai"`` (default) is the training recipe as fastai v2 ran it for the
thesis (``cnn_learner`` + ``fit_one_cycle`` twice); ``recipe="literal"`` is a plainer reading of the
thesis's text. Each point where they differ is its own field (``RECIPE_FIELDS``); a field left
unset (None) takes the recipe's value, a field given explicitly keeps it. docs/trainer.md has the
table.

Field metadata keys (read by the command lines): ``help``; ``choices`` (allowed strings);
``grid`` (True for the sweep's grid axes); ``identity`` (False for fields the trial id ignores);
``recipe`` (True for fields whose default comes from the recipe).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from common.cli import UserError
from common.schema import TASKS, task_key


class ConfigError(UserError):
    """A configuration value or key is invalid (printed as one line by the CLIs)."""


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its help (and other command-line facts) in the metadata."""
    return field(default=default, metadata={"help": help, **meta})


def _recipe(name: str, help: str, **meta: Any) -> Any:
    """A recipe point: None = take the value of the config's ``recipe``."""
    shown = "; ".join(f"{recipe}: {_show(values[name])}" for recipe, values in RECIPES.items())
    return field(default=None, metadata={"help": help, "recipe": True,
                                         "default_help": f"from --recipe ({shown})", **meta})


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


#: The values each recipe gives its point fields. "fastai": what fastai v2's cnn_learner and
#: fit_one_cycle did in the thesis's code; "literal": the thesis's text read without fastai
#: (this project's behaviour before the fastai recipe became the default).
RECIPES: dict[str, dict[str, Any]] = {
    "fastai": {
        "lr_groups": "model", "wd_bn_bias": False, "adam_eps": 1e-5,
        "beta1_cycle": (0.95, 0.85, 0.95), "lr_schedule": "combined_cos",
        "aug_style": "fastai", "head_bn_bias": 1e-3, "pool_order": "max,avg",
        "densenet_final_relu": False,
    },
    "literal": {
        "lr_groups": "body-head", "wd_bn_bias": True, "adam_eps": 1e-8,
        "beta1_cycle": (0.9, 0.9, 0.9), "lr_schedule": "onecycle_lr",
        "aug_style": "literal", "head_bn_bias": 0.0, "pool_order": "avg,max",
        "densenet_final_relu": True,
    },
}
RECIPE_FIELDS: tuple[str, ...] = tuple(RECIPES["fastai"])


@dataclass
class TrainConfig:
    # --- what is trained --------------------------------------------------------------------
    store: str = _f("", "store location (local/shared path or s3://...)", identity=False)
    model: str = _f("resnet50", "trainer.models name; 'efficientnet' = the variant matched to "
                    "the resolution", grid=True)
    resolution: int = _f(320, "store resolution to read (pixels, square)", grid=True)
    task_mode: str = _f("multi", "'multi': one model with an output per task (masked loss); "
                        "'single': one binary model for --task, as the thesis trained",
                        choices=("multi", "single"))
    task: str = _f("", "the task in single mode (e.g. 'Cardiomegaly'); '' in multi mode", grid=True)
    tasks: tuple[str, ...] = _f(TASKS, "tasks of a multi-task model, report order, by the store's "
                                "own label names (default on the command line: the store's default "
                                "tasks; CheXpert's five for CheXpert)")
    seed: int = _f(0, "drives head init, dropout and augmentation (>= 0)", grid=True)
    weights: str = _f("imagenet", "'imagenet', 'none' or a path to a state_dict file")
    weights_dir: str = _f("", "local cache of ImageNet weights ('' = trainer.weights default)",
                          identity=False)

    # --- recipe -------------------------------------------------------------------------------
    recipe: str = _f("fastai", "'fastai': the thesis's fastai v2 recipe; 'literal': the thesis's "
                     "text without fastai; sets every recipe field left unset",
                     choices=tuple(RECIPES))

    # --- schedule -------------------------------------------------------------------------------
    epochs_frozen: int = _f(1, "stage 1: body frozen (its BatchNorm still trains)")
    epochs_unfrozen: int = _f(5, "stage 2: everything trains")
    lr_frozen: float = _f(5e-3, "stage-1 one-cycle max LR (every trainable parameter)")
    lr_body: float = _f(2.5e-5, "stage-2 max LR of the first (input-side) parameter group")
    lr_head: float = _f(2.5e-3, "stage-2 max LR of the head")
    lr_groups: Optional[str] = _recipe("lr_groups",
        "stage-2 parameter groups: 'model' = the model's layer groups with LRs spaced "
        "geometrically from lr_body to lr_head (fastai's slice); 'body-head' = two groups",
        choices=("model", "body-head"))
    lr_schedule: Optional[str] = _recipe("lr_schedule",
        "one-cycle curve per stage: 'combined_cos' (fastai's fit_one_cycle) or 'onecycle_lr' "
        "(torch's OneCycleLR: ends at max/(div*final_div))",
        choices=("combined_cos", "onecycle_lr"))
    onecycle_pct_start: float = _f(0.25, "share of a stage's steps spent warming up")
    onecycle_div: float = _f(25.0, "initial LR = max LR / div")
    onecycle_final_div: float = _f(1e5, "final LR = max LR / final_div")
    weight_decay: float = _f(0.1, "decoupled (AdamW, fastai's true_wd) weight decay")
    wd_bn_bias: Optional[bool] = _recipe("wd_bn_bias",
        "weight decay also on normalisation-layer parameters and biases (fastai's wd_bn_bias)")
    adam_eps: Optional[float] = _recipe("adam_eps", "Adam's epsilon")
    beta1_cycle: Optional[tuple[float, float, float]] = _recipe("beta1_cycle",
        "Adam beta1 at the start, peak-LR point and end of each stage (fastai's moms), cosine "
        "like the LR")
    beta2: float = _f(0.99, "Adam beta2 (fastai's sqr_mom)")
    carry_optimizer: bool = _f(False, "keep stage 1's Adam moments for stage 2; fastai's "
                               "Learner.unfreeze() clears them (Optimizer.clear_state), so both "
                               "recipes start stage 2 with fresh moments")
    batch_studies: int = _f(40, "studies per batch (1-3 images each)")
    shuffle: bool = _f(False, "shuffle the studies each epoch (keyed by seed and epoch); the "
                       "thesis did not")

    # --- the head and body details (trainer.models.create_model options) -----------------------
    head_bn_bias: Optional[float] = _recipe("head_bn_bias",
                                            "initial bias of the head's BatchNorm1d layers")
    pool_order: Optional[str] = _recipe("pool_order",
                                        "order of the pooled features the head concatenates",
                                        choices=("max,avg", "avg,max"))
    densenet_final_relu: Optional[bool] = _recipe("densenet_final_relu",
        "DenseNet body ends with a ReLU after norm5 (torchvision's classifier path); fastai's "
        "body ends at norm5")

    # --- augmentation (training only) ----------------------------------------------------------
    augment: bool = _f(True, "off: training sees the stored pixels as validation does")
    aug_style: Optional[str] = _recipe("aug_style",
        "'fastai': aug_transforms (flip, warp, rotate, zoom in, logit-space lighting, each part "
        "drawn on its own); 'literal': rotation + zoom out + perspective in one draw, linear "
        "brightness/contrast", choices=("fastai", "literal"))
    aug_p_geometric: float = _f(0.75, "probability of each geometric part (fastai's p_affine)")
    aug_p_intensity: float = _f(0.75, "probability of each lighting part (fastai's p_lighting)")
    aug_rotation_deg: float = _f(30.0, "rotation uniform in [-deg, +deg]")
    aug_flip_p: float = _f(0.5, "fastai style: probability of a horizontal flip")
    aug_max_zoom: float = _f(1.1, "fastai style: zoom in by a factor uniform in [1, max]")
    aug_max_warp: float = _f(0.2, "fastai style: perspective warp magnitude")
    aug_max_lighting: float = _f(0.2, "fastai style: brightness and contrast strength (logit "
                                 "space)")
    aug_brightness: float = _f(0.2, "literal style: additive shift uniform in [-b, +b]")
    aug_contrast: float = _f(0.2, "literal style: contrast factor uniform in [1 - c, 1 + c]")
    aug_zoom_out: float = _f(0.2, "literal style: shrink by up to 1/(1 + z), black border")
    aug_perspective: float = _f(0.1, "literal style: each corner moves up to this share of the "
                                "half-width")

    # --- data subsets (smoke runs, the demo budget) ---------------------------------------------
    max_train_studies: int = _f(0, "0 = all; else the first N studies in store order")
    max_valid_studies: int = _f(0, "0 = all")

    # --- execution (do not change the result on a given device) ---------------------------------
    device: str = _f("auto", "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    amp: str = _f("auto", "'auto' (bf16 on CUDA, off on CPU), 'bf16', 'off'",
                  choices=("auto", "bf16", "off"))
    channels_last: str = _f("auto", "'auto' (on for CUDA), 'on', 'off'",
                            choices=("auto", "on", "off"))
    workers: int = _f(-1, "loader worker processes; -1 = auto, 0 = in-process", identity=False)
    cuda_graphs: str = _f("auto", "replay forward+backward as CUDA graphs: 'auto' (CUDA at <= "
                          "320 px), 'on', 'off'", choices=("auto", "on", "off"), identity=False)
    compile: str = _f("auto", "torch.compile (inductor) the model: 'auto' (CUDA at >= 400 px), "
                      "'on', 'off'; the same maths fused, equal within a tolerance "
                      "(trainer/compile.py)", choices=("auto", "on", "off"), identity=False)
    cache_dir: str = _f("", "node-local store cache dir (preprocessing/cache.py); '' = read the "
                        "store directly", identity=False)

    # --- normalisation and validation (once, here) ------------------------------------------------
    def __post_init__(self) -> None:
        # Which recipe fields took the recipe's value: from_dict re-derives those when the recipe
        # changes, and keeps the ones given explicitly.
        self._from_recipe = frozenset(n for n in RECIPE_FIELDS if getattr(self, n) is None)
        if self.recipe in RECIPES:
            for name in self._from_recipe:
                setattr(self, name, RECIPES[self.recipe][name])
        self.validate()
        from trainer.models import resolve_model_name
        self.model = resolve_model_name(self.model, self.resolution)

    def validate(self) -> None:
        from trainer.models import MIN_RESOLUTION
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name}: {getattr(self, f.name)!r} is not one of "
                                  f"{', '.join(map(repr, choices))}")
        if self.task_mode == "single" and not self.task:
            raise ConfigError("task: single task mode needs a task, e.g. --task Cardiomegaly")
        if self.task_mode == "multi" and self.task:
            raise ConfigError("task: only used with --task-mode single")
        if not self.tasks or not all(isinstance(t, str) and t.strip() for t in self.tasks):
            raise ConfigError(f"tasks: need at least one non-empty task name, got {list(self.tasks)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks: duplicate task in {list(self.tasks)}")
        if self.resolution < MIN_RESOLUTION:
            raise ConfigError(f"resolution: need >= {MIN_RESOLUTION} px, got {self.resolution}")
        if self.batch_studies <= 0:
            raise ConfigError(f"batch_studies: must be positive, got {self.batch_studies}")
        for name in ("seed", "epochs_frozen", "epochs_unfrozen", "max_train_studies",
                     "max_valid_studies"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.epochs_frozen + self.epochs_unfrozen == 0:
            raise ConfigError("epochs_frozen + epochs_unfrozen: at least one epoch is needed")
        if len(self.beta1_cycle) != 3 or not all(0 <= b < 1 for b in (*self.beta1_cycle, self.beta2)):
            raise ConfigError(f"beta1_cycle, beta2: need values in [0, 1), got "
                              f"{self.beta1_cycle}, {self.beta2}")
        for name in ("lr_frozen", "lr_body", "lr_head", "onecycle_div", "onecycle_final_div",
                     "adam_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if not 0 < self.onecycle_pct_start < 1:
            raise ConfigError(f"onecycle_pct_start: must be in (0, 1), got {self.onecycle_pct_start}")
        for name in ("aug_p_geometric", "aug_p_intensity", "aug_flip_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}: must be a probability, got {getattr(self, name)}")
        for name in ("aug_rotation_deg", "aug_brightness", "aug_contrast", "aug_zoom_out",
                     "aug_perspective", "aug_max_warp", "aug_max_lighting", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("aug_contrast", "aug_max_lighting"):
            if getattr(self, name) >= 1:
                raise ConfigError(f"{name}: must be < 1, got {getattr(self, name)}")
        if self.aug_max_zoom < 1:
            raise ConfigError(f"aug_max_zoom: must be >= 1 (zoom in), got {self.aug_max_zoom}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: {self.device!r} is not 'auto', 'cpu', 'cuda' or 'cuda:N'")
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

    def model_options(self) -> dict[str, Any]:
        """The recipe's keyword arguments of trainer.models.create_model."""
        return {"head_bn_bias": self.head_bn_bias, "pool_order": self.pool_order,
                "densenet_final_relu": self.densenet_final_relu}

    # --- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, resolved (recipe fields hold the recipe's values), JSON-ready."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: "TrainConfig | None" = None) -> "TrainConfig":
        """A config from a mapping; keys not given keep ``base``'s (default: the defaults').

        A recipe field that ``base`` took from its recipe is taken from the new config's recipe
        again (``{"recipe": "literal"}`` switches all of them); one ``base`` was given explicitly
        stays as it was.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a mapping of field -> value, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)} "
                              f"(known: {', '.join(known)})")
        base = base or cls()
        values = base.to_dict()
        for name in base._from_recipe:
            values[name] = None
        hints = _type_hints(cls)
        values.update(data)
        for key, value in values.items():
            values[key] = _coerce(key, value, hints[key])
        return cls(**values)

    @classmethod
    def from_file(cls, location: str, base: "TrainConfig | None" = None) -> "TrainConfig":
        """A JSON or YAML config file (by extension; JSON is also valid YAML)."""
        return cls.from_dict(read_config_file(location), base=base)

    # --- identity ---------------------------------------------------------------------------------
    @staticmethod
    def result_fields() -> tuple[str, ...]:
        """Fields that change the trial's result; the trial id hashes these.

        Left out (metadata ``identity: False``): where the store lives (its content is covered by
        the manifest hash), the weight cache location (its content is covered by ``weights``),
        loader workers (results do not depend on them), CUDA graphs (the same kernels, replayed),
        compilation (the same maths, fused) and the node-local cache folder. Device, amp and
        channels_last stay in: a bf16 GPU run is not the same experiment as an fp32 CPU run.
        """
        return tuple(f.name for f in dataclasses.fields(TrainConfig)
                     if f.metadata.get("identity", True))

    def result_dict(self) -> dict[str, Any]:
        d = self.to_dict()
        return {k: d[k] for k in self.result_fields()}

    def result_hash(self, manifest_hash: str) -> str:
        """sha256 (hex) of the result-determining fields and the store's manifest hash."""
        payload = json.dumps({"config": self.result_dict(), "manifest_hash": manifest_hash},
                             sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    def trial_id(self, manifest_hash: str) -> str:
        """``r{res}-{model}-s{seed}-{mode}[-{task_key}]-{hash10}`` (docs/architecture.md).

        The id names a folder on every filesystem and an S3 key, so ``timm:convnext_tiny`` is
        spelled ``timm-convnext_tiny`` in it (the config keeps the real name).
        """
        parts = [f"r{self.resolution}", self.model.replace(":", "-"), f"s{self.seed}", self.task_mode]
        if self.task_mode == "single":
            parts.append(task_key(self.task))
        parts.append(self.result_hash(manifest_hash)[:10])
        return "-".join(parts)


def field_help() -> dict[str, str]:
    """{field: its help} from the field metadata (the --help text of every flag)."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}


def read_config_file(location: str) -> dict[str, Any]:
    """The mapping in a JSON or YAML config file (by extension; JSON is also valid YAML)."""
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
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {location}: expected a mapping of field -> value")
    return data


@functools.cache
def _type_hints(cls) -> dict[str, Any]:
    """The fields' resolved types: resolving them costs ~2 ms, and a sweep builds a config per trial."""
    return typing.get_type_hints(cls)


def _optional_of(hint: Any) -> Any:
    """``X`` for ``Optional[X]`` / ``X | None``; None for any other type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type; lists become tuples; ints are accepted as floats.

    Strings are parsed for numbers and lists (command lines, YAML 1.1's '5e-3'), and 'true'/'false'
    for booleans, so every front end can hand over what it read."""
    inner = _optional_of(hint)
    if inner is not None:
        return None if value is None else _coerce(key, value, inner)
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
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
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
