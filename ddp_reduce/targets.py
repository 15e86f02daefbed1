"""Your own model, data and loss, named in the config in Hydra's convention:

    +model._target_=mypkg.nets.Net +model.width=64      # Net(width=64), an nn.Module
    +data._target_=mypkg.data.make_splits               # -> (train, eval) map-style Datasets
    +loss._target_=mypkg.losses.TokenLoss               # TokenLoss() called as loss(output, target)

Each is checked before any rank starts: importable, callable, arguments that bind, and what it
returns of the right kind; anything else is a ConfigError naming the key and what was found.
Hydra's own ``instantiate`` builds them (so ``_partial_`` and nested ``_target_`` work too).

A config file is code: a ``_target_`` is called with the config's arguments. What can be
checked before the call is: a target (nested ones too) from the standard library or builtins
is refused (``builtins.open``, ``shutil.copyfile``, ``os.remove`` would act on files), and a
class must be of the kind asked for (an ``nn.Module`` subclass for a model).
"""

from __future__ import annotations

import inspect
import sys
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
        except SystemExit as exc:  # sys.exit() at import: never the run's own exit (code 0)
            error = f"importing {'.'.join(parts[:i])} called sys.exit({exc.code!r})"
            obj = None
            break
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
    origin = _standard_module(target, obj)
    if origin is not None:
        raise ConfigError(
            f"{key}._target_",
            target,
            f"a callable of your own or of a library, not of Python's {origin!r} module (a "
            "standard-library target could act on files or processes)",
        )
    return obj


def _standard_module(target: str, obj: Any) -> str | None:
    """The standard-library (or builtins) module ``target`` names or ``obj`` comes from, if
    any: by its dotted path and by the object's own ``__module__`` (an alias of ``os.remove``
    in a package of yours is refused too)."""
    for name in (target, getattr(obj, "__module__", None) or ""):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in ("builtins", "__builtin__"):
            return top
    return None


def nested_targets(key: str, kwargs: Any, path: str = "") -> list[tuple[str, str]]:
    """The ``_target_`` values nested in ``kwargs`` (Hydra builds them too), with their keys."""
    found = []
    if isinstance(kwargs, dict):
        for k, v in kwargs.items():
            where = f"{path}.{k}" if path else str(k)
            if k == "_target_" and isinstance(v, str):
                found.append((f"{key}.{path}" if path else key, v))
            else:
                found += nested_targets(key, v, where)
    elif isinstance(kwargs, list):
        for i, v in enumerate(kwargs):
            found += nested_targets(key, v, f"{path}[{i}]")
    return found


def build(
    key: str, target: str, kwargs: dict[str, Any], what: str, kind: type | None = None
) -> Any:
    """Call ``target(**kwargs)`` as Hydra's instantiate does; ``what`` says what it must build.
    ``kind``: the class it must build, checked before the call where the target is a class."""
    from hydra.utils import instantiate

    obj = resolve(key, target)
    for nested_key, nested in nested_targets(key, kwargs):
        resolve(nested_key, nested)  # the same checks, before anything is called
    if kind is not None and inspect.isclass(obj) and not issubclass(obj, kind):
        raise ConfigError(
            f"{key}._target_", target, f"{what}; it is the class {obj.__name__}, not one"
        )
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
    except SystemExit as exc:  # never the run's own exit
        raise ConfigError(
            f"{key}._target_", target, f"{what}; building it called sys.exit({exc.code!r})"
        ) from None
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ConfigError(
            f"{key}._target_",
            target,
            f"{what}; building it raised {type(cause).__name__}: {str(cause).splitlines()[0]}",
        ) from None
