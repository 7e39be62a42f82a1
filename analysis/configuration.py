"""What "the same configuration" means when results are compared or pooled.

Two trials may share a table, a mean or a paired test only when everything that decides their
result is identical except the grid axes (resolution, model, seed, task mode, task). That is the
trial's TrainConfig restricted to ``TrainConfig.result_fields()`` (the fields the trial id hashes),
minus the grid axes, plus the store's manifest hash (the same data and validation studies). Fields
that do not change results (store location, loader workers, caches, CUDA graphs) are left out, so
moving a store or changing workers never splits a sweep into two configurations.

A field the running code does not know (a record of an older or newer trainer) stays in: we cannot
tell whether it changed the result, so it must match too.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

#: The axes a sweep varies on purpose; everything else must match for trials to be compared.
GRID_AXES = ("resolution", "model", "seed", "task_mode", "task")
MANIFEST_FIELD = "manifest_hash"


def _not_result_fields() -> frozenset[str]:
    import dataclasses

    from trainer.config import TrainConfig
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return frozenset(known - set(TrainConfig.result_fields()))


def _canonical(value: Any) -> Any:
    """JSON-equal values compare equal: tuples are lists, 1 == 1.0 (a float field written as int)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    return str(value)


def configuration_fields(config: dict[str, Any], manifest_hash: str | None) -> dict[str, Any]:
    """The part of a trial config (or a sweep's base config) that must match for comparison."""
    drop = set(GRID_AXES) | _not_result_fields()
    fields = {k: _canonical(v) for k, v in config.items() if k not in drop}
    fields[MANIFEST_FIELD] = manifest_hash or ""
    return fields


def configuration_key(config: dict[str, Any], manifest_hash: str | None) -> str:
    """A short stable name of a configuration: the first 10 hex digits of its canonical sha256."""
    payload = json.dumps(configuration_fields(config, manifest_hash), sort_keys=True,
                         separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def differences(fields: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """'lr_head=0.02 (main 0.01)' for every field where ``fields`` differs from ``reference``."""
    out = []
    for key in sorted(set(fields) | set(reference)):
        ref, own = reference.get(key, "(absent)"), fields.get(key, "(absent)")
        if ref != own:
            if key == MANIFEST_FIELD:   # another store: the hashes say only that
                ref, own = str(ref)[:12], str(own)[:12]
            out.append(f"{key}={_show(own)} (main {_show(ref)})")
    return out


def _show(value: Any) -> str:
    """1.0 as 1 again (values were canonicalised to floats), lists as comma lists."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return ",".join(_show(v) for v in value)
    return str(value)
