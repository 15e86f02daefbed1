"""The shape of the code: layers without cycles, defaults stated once, light entry paths."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from ddp_reduce.config import RunConfig, to_dict
from tests.helpers import REPO, config_dict

PACKAGE = REPO / "ddp_reduce"
ENTRY = {"ddp_reduce", "ddp_reduce.cli", "ddp_reduce.train", "ddp_reduce.bench"}
LAYERS = ("layer", "core", "run", "analysis", "entry")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    if module in ENTRY:
        return "entry"
    if module.startswith("ddp_reduce.layer"):
        return "layer"
    if module.startswith("ddp_reduce.run"):
        return "run"
    if module.startswith("ddp_reduce.analysis"):
        return "analysis"
    return "core"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, at the top or inside functions."""
    found = set()
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            # `from pkg import module` depends on the module; `from module import name` on it
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != this:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of nodes, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, or of an entry point, by anything but an entry point."""
    wrong = []
    for module, deps in graph.items():
        for dep in deps:
            higher = LAYERS.index(layer(dep)) > LAYERS.index(layer(module))
            if module not in ENTRY and (higher or layer(dep) == "entry"):
                wrong.append(f"{module} ({layer(module)}) imports {dep} ({layer(dep)})")
    return wrong


def test_the_layer_check_finds_planted_violations():
    planted = {
        "ddp_reduce.config": {"ddp_reduce.run.job"},
        "ddp_reduce.run.launch": {"ddp_reduce.train"},
        "ddp_reduce.analysis.study": {"ddp_reduce.run.launch", "ddp_reduce.config"},
    }
    assert len(layer_violations(planted)) == 2


def test_no_layer_imports_a_higher_one_and_nothing_imports_an_entry_point():
    assert not layer_violations(import_graph())


THIRD_PARTY_FOR_LAYER = {"torch"}  # and the standard library


def outside_imports(path: Path) -> set[str]:
    """The top-level names of every module ``path`` imports that is not the standard library."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name != "__future__"}


def test_the_layer_imports_torch_the_standard_library_and_itself_only():
    graph = import_graph()
    layer_files = sorted((PACKAGE / "layer").glob("*.py"))
    assert layer_files
    for path in layer_files:
        module = module_name(path)
        deps = graph[module]
        assert all(dep.startswith("ddp_reduce.layer") for dep in deps), (module, deps)
        assert outside_imports(path) <= THIRD_PARTY_FOR_LAYER | {"ddp_reduce"}, module


def test_the_layer_rule_finds_a_planted_import(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import numpy as np\nfrom hydra import compose\nimport torch\nimport os\n")
    assert outside_imports(planted) - THIRD_PARTY_FOR_LAYER == {"numpy", "hydra"}
    assert layer_violations({"ddp_reduce.layer.reducer": {"ddp_reduce.data"}})


def test_the_audit_probe_imports_torch_and_the_standard_library_only(tmp_path):
    """The probe runs inside users' processes: nothing of the package, nothing else installed."""
    probe = PACKAGE / "auditing" / "probe.py"
    assert outside_imports(probe) <= THIRD_PARTY_FOR_LAYER
    assert not import_graph()["ddp_reduce.auditing.probe"]
    planted = tmp_path / "probe.py"
    planted.write_text(probe.read_text() + "\nimport numpy\nfrom ddp_reduce import layer\n")
    assert outside_imports(planted) - THIRD_PARTY_FOR_LAYER == {"numpy", "ddp_reduce"}


def test_attach_loads_the_layer_and_nothing_else_of_the_package():
    loaded = _modules_loaded("import ddp_reduce\nddp_reduce.attach")
    ours = {m for m in loaded if m.startswith("ddp_reduce")}
    assert ours <= {"ddp_reduce"} | {m for m in ours if m.startswith("ddp_reduce.layer")}, ours
    assert "ddp_reduce.layer.reducer" in loaded
    # numpy is not listed: torch itself imports it where it is installed
    for heavy in ("hydra", "omegaconf", "tensorboard", "sklearn"):
        assert heavy not in loaded, heavy


def test_composing_with_no_overrides_gives_the_schema_defaults():
    composed = config_dict()
    assert composed == to_dict(RunConfig())


# a study's sweep and an experiment's overlay are no schema groups
GROUP_OPTIONS = [
    p
    for p in sorted((REPO / "conf").glob("*/*.yaml"))
    if p.parent.name in RunConfig.__dataclass_fields__
]


@pytest.mark.parametrize("path", GROUP_OPTIONS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_group_options_hold_only_values_that_differ_from_the_defaults(path):
    group = path.parent.name
    defaults = OmegaConf.to_container(OmegaConf.structured(RunConfig))[group]
    values = yaml.safe_load(path.read_text())
    same = [k for k, v in values.items() if k != "name" and defaults.get(k) == v]
    assert not same, f"{path.name} restates defaults: {same}"


def _modules_loaded(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "--from", "sum/sum", "--to", "mean/mean", "--world-size", "2",
         "--batch-size", "16", "--optim", "sgd", "--lr", "0.1"],
        ["convert", "--from", "pytorch-ddp", "--to", "torchtitan", "--world-size", "2",
         "--batch-size", "16", "--optim", "sgd", "--lr", "0.1"],
        ["convert", "--list-presets"],
        ["--help"],
        ["convert", "--help"],
        ["audit", "--help"],
    ],
    ids=["convert", "convert-presets", "list-presets", "help", "convert-help", "audit-help"],
)  # fmt: skip
def test_the_calculator_and_the_help_load_neither_torch_nor_hydra(argv):
    code = (
        "import sys\n"
        f"sys.argv = ['ddp-reduce', *{argv!r}]\n"
        "from ddp_reduce.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
    )
    loaded = _modules_loaded(code)
    assert "torch" not in loaded and "hydra" not in loaded and "omegaconf" not in loaded


def test_every_config_group_is_packaged():
    """An installed (non-editable) package carries conf/ as ddp_reduce.conf: each group folder
    must be a package of its own, or setuptools leaves its YAML files out."""
    import tomllib

    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    groups = sorted(d.name for d in (REPO / "conf").iterdir() if d.is_dir())
    for group in groups:
        assert f"ddp_reduce.conf.{group}" in setup["packages"], group
        assert setup["package-data"][f"ddp_reduce.conf.{group}"] == ["*.yaml"], group


LONGEST_FUNCTION = 80  # lines, decorators excluded: a longer one is split into named helpers


def long_functions(path: Path, limit: int = LONGEST_FUNCTION) -> list[str]:
    """The functions (methods and nested ones included) of ``path`` longer than ``limit``."""
    return [
        f"{path.name}:{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > limit
    ]


def test_the_length_check_finds_a_planted_long_function(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(LONGEST_FUNCTION))
    planted = tmp_path / "planted.py"
    planted.write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}")
    assert [line.split(":")[1] for line in long_functions(planted)] == ["long"]


def test_no_function_of_the_package_is_longer_than_the_bound():
    too_long = [f for path in sorted(PACKAGE.rglob("*.py")) for f in long_functions(path)]
    assert not too_long, too_long


# Each integration may import the layer, the integrations' own shared module and its framework.
INTEGRATIONS = {
    "accelerate": {"torch", "accelerate"},
    "lightning": {"torch", "lightning"},
    "transformers": {"torch", "transformers"},
    "report": {"torch"},
    "__init__": set(),
}


def test_the_integrations_import_the_layer_and_their_framework_only():
    graph = import_graph()
    files = sorted((PACKAGE / "integrations").glob("*.py"))
    assert {p.stem for p in files} == set(INTEGRATIONS)
    for path in files:
        module = module_name(path)
        deps = graph[module]
        allowed = ("ddp_reduce.layer", "ddp_reduce.integrations")
        assert all(dep.startswith(allowed) for dep in deps), (module, deps)
        assert outside_imports(path) <= INTEGRATIONS[path.stem] | {"ddp_reduce"}, module
    for module, deps in graph.items():  # the layer and the rest never import them
        if not module.startswith("ddp_reduce.integrations"):
            assert not any(d.startswith("ddp_reduce.integrations") for d in deps), module


def test_importing_ddp_reduce_loads_no_framework_and_dir_lists_the_api():
    loaded = _modules_loaded("import ddp_reduce\nddp_reduce.attach\ndir(ddp_reduce)")
    for framework in ("accelerate", "lightning", "transformers", "ddp_reduce.integrations"):
        assert framework not in loaded, framework
    names = dir(__import__("ddp_reduce"))
    for public in ("attach", "Reducer", "StepReport", "rank_batch_sampler", "convert"):
        assert public in names, public


@pytest.mark.parametrize(
    "argv, code",
    [(["optim.lr=-1"], 2), (["train.steps=2", "hydra.run.dir={run}"], 2)],
    ids=["a-value", "an-unreadable-summary"],
)
@pytest.mark.cli
def test_a_refused_run_is_refused_before_torch_loads(tmp_path, argv, code):
    """A value the config refuses, or a run folder the launcher refuses, is said within a second:
    torch (2 s to load) is imported only once the run is let through."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("[1, 2]")
    argv = [a.format(run=run) for a in argv]
    if "hydra.run.dir" not in " ".join(argv):
        argv.append(f"hydra.run.dir={tmp_path / 'other'}")
    program = (
        "import sys\n"
        f"sys.argv = ['ddp-reduce', *{argv!r}]\n"
        "from ddp_reduce.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n"
        f"    assert e.code == {code}, e.code\n"
        "else:\n    raise AssertionError('not refused')\n"
    )
    assert "torch" not in _modules_loaded(program)
