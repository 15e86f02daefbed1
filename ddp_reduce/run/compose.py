"""The composed config of a run, from Hydra overrides (the launchers' and the studies' way in)."""

from __future__ import annotations

import copy
import functools
import os
import re

from omegaconf import OmegaConf

from ddp_reduce.config import register_schema


def compose_config(overrides: list[str]) -> tuple[dict, str]:
    """The resolved config (without Hydra's own node) and its run directory.

    Every rank of a torchrun job composes the same config from the same overrides with Hydra's
    compose API (no ``@hydra.main``, which would make one timestamped directory per rank).
    """
    cfg = _with_values(overrides)
    if cfg is None:
        cfg = _compose(tuple(overrides))
    run_dir = OmegaConf.select(cfg, "hydra.run.dir") or ""
    run_dir = os.path.abspath(run_dir) if run_dir.strip() else run_dir  # empty: refused later
    container = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    container.pop("hydra")
    return container, run_dir


def _compose(overrides: tuple[str, ...]):
    from hydra import compose, initialize_config_module

    register_schema()
    with initialize_config_module("ddp_reduce.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@functools.lru_cache(maxsize=16)
def _composed_groups(selections: tuple[str, ...]):
    """The config Hydra composes from these config-group choices alone; never resolved here
    (its ``${now:...}`` run directory is resolved in each copy)."""
    return _compose(selections)


def _with_values(overrides: list[str]):
    """Hydra's composition of ``overrides``, taking the config-group choices' composition from
    a per-process cache and applying the plain ``key=value`` overrides to a copy of it with
    Hydra's own step for them (which is what Hydra does after composing the groups). A study
    or a sweep composes hundreds of runs that differ in a few values only, and a composition
    costs 0.15-0.3 s. None where an override is anything else (``+``, ``~``, ``hydra.*``, a
    package) or is refused: Hydra's full composition then gives the answer, its error included.
    """
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra's own error, from the full composition
        return None
    groups = _group_names()
    selections, values = [], []
    for text, override in zip(overrides, parsed, strict=True):
        key = override.key_or_group
        if key.split("/")[0] in groups and "." not in key:
            selections.append(text)
        elif (
            override.is_add()
            or override.is_force_add()
            or override.is_delete()
            or override.package is not None
            or key.split(".")[0] == "hydra"
            or "/" in key
        ):
            return None
        else:
            values.append(override)
    try:
        cfg = copy.deepcopy(_composed_groups(tuple(selections)))
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    except Exception:
        return None
    return cfg


@functools.lru_cache(maxsize=1)
def _group_names() -> frozenset[str]:
    """The config groups (``data``, ``model``, ...): the folders of the config package."""
    from importlib.resources import files

    return frozenset(p.name for p in files("ddp_reduce.conf").iterdir() if p.is_dir())


OVERRIDE = re.compile(r"^[+~]{0,2}([A-Za-z_][\w.@/-]*)=")


def override_key(override: str) -> str | None:
    """The key an override sets (``+a.b=1``, ``a.b=1`` and ``a=x`` set ``a.b``, ``a.b``, ``a``);
    None where it sets none (no ``=``, or not a key)."""
    m = OVERRIDE.match(override)
    return m.group(1) if m else None
