"""Named model configurations. Configurations are data: one JSON file each in ``configs/``.

Every named configuration also exists with the suffix ``_fullattn``: the same model with every
block at the study level (plain full attention over all tokens of the study), the baseline HLIP is
measured against.
"""
from __future__ import annotations

import copy
import json
from importlib import resources

from ..loss import LOSSES
from .encoder import LEVELS

FULLATTN = "_fullattn"


def _base_names() -> list[str]:
    folder = resources.files(__package__) / "configs"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def list_configs() -> list[str]:
    """Names of all configurations, the full-attention baselines included."""
    names = _base_names()
    return sorted(names + [n + FULLATTN for n in names])


def level_schedule(levels, depth: int) -> list[str]:
    """The per-block level list from either a list of levels or a {level: [block indices]} map."""
    if isinstance(levels, dict):
        schedule: list[str | None] = [None] * depth
        for level, indices in levels.items():
            if level not in LEVELS:
                raise ValueError(f"unknown attention level {level!r}; expected one of {LEVELS}")
            for i in indices:
                if not 0 <= i < depth:
                    raise ValueError(f"block index {i} for level {level!r} is outside 0..{depth - 1}")
                if schedule[i] is not None:
                    raise ValueError(f"block {i} is given two levels ({schedule[i]!r} and {level!r})")
                schedule[i] = level
        missing = [i for i, s in enumerate(schedule) if s is None]
        if missing:
            raise ValueError(f"blocks {missing} have no attention level")
        return list(schedule)  # type: ignore[arg-type]
    levels = list(levels)
    if len(levels) != depth:
        raise ValueError(f"{len(levels)} levels given for a depth of {depth}")
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"unknown attention level {level!r}; expected one of {LEVELS}")
    return levels


def merge_config(base: dict, overrides: dict) -> dict:
    """Merge ``overrides`` into the configuration ``base`` in place (nested dicts merge; a level
    schedule is replaced whole) and return ``base``."""
    for key, value in overrides.items():
        # a level schedule is replaced whole: merging two schedules would mix their blocks
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "levels":
            merge_config(base[key], value)
        else:
            base[key] = value
    return base


def get_config(name: str, **overrides) -> dict:
    """A fresh copy of a named configuration with ``overrides`` merged in (nested dicts merge).

    Top-level keys: name, description, embed_dim, loss ('clip', 'siglip' or 'dual'), vision, text.
    ``vision.levels`` comes back as an explicit per-block list.
    """
    base_name = name[: -len(FULLATTN)] if name.endswith(FULLATTN) else name
    if base_name not in _base_names():
        raise KeyError(f"unknown model configuration {name!r}; known: {', '.join(list_configs())}")
    text = (resources.files(__package__) / "configs" / f"{base_name}.json").read_text()
    cfg = json.loads(text)
    if name.endswith(FULLATTN):
        cfg["name"] = name
        cfg["description"] = "Full-attention baseline of " + base_name + ": every block attends over the whole study."
        cfg["vision"]["levels"] = ["study"] * int(cfg["vision"]["depth"])
    cfg = merge_config(cfg, copy.deepcopy(overrides))
    cfg["vision"]["levels"] = level_schedule(cfg["vision"]["levels"], int(cfg["vision"]["depth"]))
    if cfg.get("loss", "clip") not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {cfg['loss']!r}")
    return cfg
