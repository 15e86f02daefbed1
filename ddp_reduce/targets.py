"""Your own model, data and loss, named in the config in Hydra's convention:

    +model._target_=mypkg.nets.Net +model.width=64      # Net(width=64), an nn.Module
    +data._target_=mypkg.data.make_splits               # -> (train, eval) map-style Datasets
    +loss._target_=mypkg.losses.TokenLoss               # TokenLoss() called as loss(output, target)

Each is checked before any rank starts: importable, callable, arguments that bind, and what it
returns of the right kind; anything else is a ConfigError naming the key and what was found.
Hydra's own ``instantiate`` builds them (so ``_partial_`` and nested ``_target_`` work too).
"""

from __future__ import annotations

import inspect
from typing import Any

from ddp_reduce.config import ConfigError


def resolve(key: str, target: str) -> Any:
    """The callable ``target`` names, or a ConfigError for ``key._target_``.

    Written here rather than taken from ``hydra.utils.get_object``, which logs an error of its
    own and words it over several lines: the message here is one, naming the key.
    """
    import importlib

    parts = target.split(".")
    obj, error = None, f"no module named {parts[0]!r}"
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as exc:
            if exc.name and not ".".join(parts[:i]).startswith(exc.name):
                error = f"importing {'.'.join(parts[:i])} failed: {exc}"  # a broken import inside
                break
            continue
        except Exception as exc:
            error = f"importing {'.'.join(parts[:i])} raised {type(exc).__name__}: {exc}"
            obj = None
            break
        for name in parts[i:]:
            if not hasattr(obj, name):
                error = f"{'.'.join(parts[:i])} has no attribute {name!r}"
                obj = None
                break
            obj = getattr(obj, name)
        break
    if obj is None:
        raise ConfigError(
            f"{key}._target_", target, f"an importable dotted path to a callable ({error})"
        )
    if not callable(obj):
        raise ConfigError(f"{key}._target_", target, f"a callable, not a {type(obj).__name__}")
    return obj


def build(key: str, target: str, kwargs: dict[str, Any], what: str) -> Any:
    """Call ``target(**kwargs)`` as Hydra's instantiate does; ``what`` says what it must build."""
    from hydra.utils import instantiate

    obj = resolve(key, target)
    arguments = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    if not kwargs.get("_partial_"):
        try:
            inspect.signature(obj).bind(**arguments)
        except TypeError as exc:
            raise ConfigError(
                f"{key}._target_", target, f"arguments that fit {what}: {exc}"
            ) from None
        except ValueError:  # no signature to inspect (a builtin): let the call decide
            pass
    try:
        return instantiate({"_target_": target, **kwargs}, _convert_="all")
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ConfigError(
            f"{key}._target_",
            target,
            f"{what}; building it raised {type(cause).__name__}: {str(cause).splitlines()[0]}",
        ) from None
