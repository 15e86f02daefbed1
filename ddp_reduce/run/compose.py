"""The composed config of a run, from Hydra overrides (the launchers' and the studies' way in)."""

from __future__ import annotations

import os
import re

from omegaconf import OmegaConf

from ddp_reduce.config import register_schema


def compose_config(overrides: list[str]) -> tuple[dict, str]:
    """The resolved config (without Hydra's own node) and its run directory.

    Every rank of a torchrun job composes the same config from the same overrides with Hydra's
    compose API (no ``@hydra.main``, which would make one timestamped directory per rank).
    """
    from hydra import compose, initialize_config_module

    register_schema()
    with initialize_config_module("ddp_reduce.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    run_dir = OmegaConf.select(cfg, "hydra.run.dir") or ""
    run_dir = os.path.abspath(run_dir) if run_dir.strip() else run_dir  # empty: refused later
    container = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    container.pop("hydra")
    return container, run_dir


OVERRIDE = re.compile(r"^[+~]{0,2}([A-Za-z_][\w.@/-]*)=")


def override_key(override: str) -> str | None:
    """The key an override sets (``+a.b=1``, ``a.b=1`` and ``a=x`` set ``a.b``, ``a.b``, ``a``);
    None where it sets none (no ``=``, or not a key)."""
    m = OVERRIDE.match(override)
    return m.group(1) if m else None
