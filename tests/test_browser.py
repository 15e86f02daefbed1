"""What a person sees in TensorBoard on a finished sweep, read from a real headless Chromium.

A sweep of four runs (reduce.op x lr) is served by ``scripts/tensorboard.sh``; the Custom Scalars
and HParams pages are loaded and read through their components (TensorBoard's UI lives in
shadow DOM, so the page is queried with JavaScript). A screenshot of each page is kept: in a
temporary folder the test prints, and in ``test-artifacts/`` at the repository's root.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import REPO, ddp_reduce, free_port, project_env

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "no chromium and chromedriver on this machine "
        "(apt-get install -y chromium chromium-driver)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ARTIFACTS = REPO / "test-artifacts"
STEPS, LOG_EVERY = 20, 2
SWEEP = ("reduce.op=sum,mean", "optim.lr=0.05,0.1")
COMMON = (f"train.steps={STEPS}", f"train.log_every={LOG_EVERY}", "train.eval_every=5")
TIMEOUT = 30  # seconds for a page to show what is asserted
TRAIN_BY_MODE = "train/loss by reduce mode (loss-op)"

# Every element under ``root`` matching ``sel``, through shadow roots.
DEEP = """
function deep(root, sel, out = []) {
  for (const el of root.querySelectorAll('*')) {
    if (el.matches(sel)) out.push(el);
    if (el.shadowRoot) deep(el.shadowRoot, sel, out);
  }
  return out;
}
"""

# The Custom Scalars page: the run selector, and per category its charts, their series (name,
# number of points) and how many lines are drawn on screen.
CUSTOM_SCALARS = (
    DEEP
    + """
const selector = deep(document, 'tf-multi-checkbox')[0];
const chart = card => {
  const view = deep(card.shadowRoot, 'vz-line-chart2')[0];
  const model = view && view._chart;
  const names = model ? model.seriesNames : [];
  const drawn = view ? deep(view.shadowRoot, 'path.line')
    .filter(p => (p.getAttribute('d') || '').length > 0 && p.getBoundingClientRect().width > 0)
    .length : 0;
  return {
    title: card.title,
    series: names.map(n => [n, model.name2datasets[n].data().length]),
    drawn_lines: drawn,
  };
};
return {
  runs: selector ? selector.names : [],
  selected: selector ? selector.outSelected : [],
  categories: deep(document, 'tf-category-paginated-view').map(v => ({
    name: v.category.name,
    charts: deep(v, 'tf-custom-scalar-multi-line-chart-card').map(chart),
  })),
};
"""
)

# The HParams page's table view: the header and the rows, as text, and where the headers are.
HPARAMS = (
    DEEP
    + """
const table = deep(document, 'tf-hparams-table-view')[0];
const grid = table && deep(table.shadowRoot, 'vaadin-grid')[0];
if (!grid) return null;
const text = cell => cell._content ? cell._content.textContent.trim().replace(/\\s+/g, ' ') : '';
const heads = [...grid.shadowRoot.querySelectorAll('thead tr th')];
return {
  header: heads.map(text),
  header_right: heads.map(h => h.getBoundingClientRect().right),
  window_width: window.innerWidth,
  rows: [...grid.shadowRoot.querySelectorAll('tbody#items tr')]
    .map(tr => [...tr.querySelectorAll('td')].map(text)),
};
"""
)


def _read(url: str, data: bytes | None = None):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def wait_for(condition, timeout: float = TIMEOUT, what: str = ""):
    """Poll ``condition()`` until it returns something true; that value is returned."""

    def attempt(_):
        try:
            return condition()
        except OSError:  # the server is not answering yet
            return None

    return WebDriverWait(None, timeout, poll_frequency=0.2).until(attempt, what)


@contextmanager
def tensorboard(logdir: Path, runs: int) -> Iterator[tuple[str, subprocess.Popen]]:
    """``scripts/tensorboard.sh logdir`` on a free port; yields once it serves ``runs`` runs."""
    port = free_port()
    server = subprocess.Popen(
        [str(REPO / "scripts" / "tensorboard.sh"), str(logdir)],
        env=project_env({"TB_PORT": str(port)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        wait_for(lambda: len(_read(base + "data/runs")) == runs, what=f"{runs} runs served")
        yield base, server
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("screenshots")
    ARTIFACTS.mkdir(exist_ok=True)
    return folder


def screenshot(browser, shots: Path, name: str, capsys) -> Path:
    path = shots / name
    assert browser.save_screenshot(str(path)), path
    shutil.copy(path, ARTIFACTS / name)
    with capsys.disabled():
        print(f"\nscreenshot: {path} (and {ARTIFACTS / name})")
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1600,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(arg)
    service = Service(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict[str, dict]:
    """The finished sweep: run name in TensorBoard -> the run's summary."""
    root = tmp_path_factory.mktemp("sweep")
    proc = ddp_reduce("--multirun", *SWEEP, *COMMON, "dist.nproc=1", f"hydra.sweep.dir={root}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = {
        f"{p.parent.name}/tb": json.loads(p.read_text()) for p in root.glob("*/summary.json")
    }
    assert len(summaries) == 4, sorted(summaries)
    return {"dir": root, "runs": summaries}


@pytest.fixture(scope="module")
def served(sweep):
    with tensorboard(sweep["dir"], runs=4) as (base, _):
        yield base


def load(browser, url: str, script: str, ready, what: str):
    """Open ``url`` afresh and wait until ``ready(state)`` holds for the page's state."""
    browser.get("about:blank")
    browser.get(url)

    def state():
        s = browser.execute_script(script)
        return s if s is not None and ready(s) else None

    return wait_for(state, what=what)


def _charts(state: dict, category: str) -> dict[str, dict]:
    return {
        c["title"]: c
        for cat in state["categories"]
        if cat["name"] == category
        for c in cat["charts"]
    }


def test_custom_scalars_charts_hold_every_run_of_their_group(browser, served, sweep, shots, capsys):
    runs = sweep["runs"]
    by_op = {op: {r for r, s in runs.items() if s["reduce_op"] == op} for op in ("sum", "mean")}
    points = STEPS // LOG_EVERY
    in_view = (TRAIN_BY_MODE, "train/loss by global batch")

    runs_of = {  # each chart on screen and the runs of its group
        (TRAIN_BY_MODE, "mean-sum"): by_op["sum"],
        (TRAIN_BY_MODE, "mean-mean"): by_op["mean"],
        ("train/loss by global batch", "N=32"): set(runs),
    }

    def drawn(s):  # the charts on screen hold every run of their group, with all its points
        # (TensorBoard fills a chart run by run: a chart with some of its runs is not done)
        charts = {(name, t): c for name in in_view for t, c in _charts(s, name).items()}
        return set(charts) == set(runs_of) and all(
            len(c["series"]) == len(runs_of[k])
            and all(n == points for _, n in c["series"])
            and c["drawn_lines"]
            for k, c in charts.items()
        )

    state = load(browser, served + "#custom_scalars", CUSTOM_SCALARS, drawn, "charts drawn")
    screenshot(browser, shots, "custom_scalars.png", capsys)

    assert set(state["runs"]) == set(runs) == set(state["selected"])
    assert [c["name"] for c in state["categories"]] == [
        f"{tag} by {group}"
        for tag in ("train/loss", "eval/loss", "eval/accuracy", "grad/global_norm_c1")
        for group in ("reduce mode (loss-op)", "global batch")
    ]
    by_mode = _charts(state, TRAIN_BY_MODE)
    assert set(by_mode) == {"mean-sum", "mean-mean"}
    for title, expected in (("mean-sum", by_op["sum"]), ("mean-mean", by_op["mean"])):
        series = dict(by_mode[title]["series"])
        assert {name.split(" (")[1].rstrip(")") for name in series} == expected, series
        assert all(name.startswith(f"grouped/train_loss/{title}/N32 ") for name in series)
        assert by_mode[title]["drawn_lines"] >= len(expected)
    by_batch = _charts(state, "train/loss by global batch")
    assert set(by_batch) == {"N=32"}
    assert len(by_batch["N=32"]["series"]) == 4  # every run has N = 32


def test_hparams_table_lists_the_runs_with_the_axes_in_view(browser, served, sweep, shots, capsys):
    runs = sweep["runs"]
    state = load(
        browser,
        served + "#hparams",
        HPARAMS,
        lambda s: len(s["rows"]) == len(runs) and all(row[0] for row in s["rows"]),
        "the HParams table",
    )
    screenshot(browser, shots, "hparams.png", capsys)

    header = state["header"]
    # the question's axes first (TensorBoard orders them by name and shows five), then metrics
    assert header == [
        "Trial ID",
        "Show Metrics",
        "N (global_batch_size)",
        "c (grad_scale)",
        "lr",
        "reduce.loss",
        "reduce.op",
        "final/train_loss",
        "final/eval_loss",
        "final/eval_accuracy",
        "final/diverged",
    ]
    for name in ("reduce.op", "lr"):  # in view without scrolling
        assert state["header_right"][header.index(name)] <= state["window_width"], name
    rows = {row[0]: dict(zip(header, row, strict=False)) for row in state["rows"]}
    assert set(rows) == set(runs)
    for run, summary in runs.items():
        row = rows[run]
        assert row["reduce.op"] == summary["reduce_op"]
        assert row["reduce.loss"] == summary["reduce_loss"]
        assert float(row["lr"]) == pytest.approx(summary["optim_effective"]["lr"])
        assert float(row["N (global_batch_size)"]) == summary["global_batch_size"]
        assert float(row["c (grad_scale)"]) == summary["grad_scale"]
        assert float(row["final/train_loss"]) == pytest.approx(
            summary["final_train_loss"], rel=1e-3
        )
        assert float(row["final/eval_accuracy"]) == pytest.approx(
            summary["final_eval_accuracy"], rel=1e-3
        )
        assert float(row["final/diverged"]) == 0


def _many_runs(root: Path, n: int) -> list[str]:
    """``n`` small runs in one group, written by the runs' own logger."""
    from ddp_reduce.run.rundir import MetricsLogger

    names = []
    for i in range(n):
        run = root / f"{i}_seed={i}"
        run.mkdir(parents=True)
        logger = MetricsLogger(run, mode="mean-mean", global_batch=32)
        for step in range(1, 6):
            logger.log(step, {"train/loss": 2.0 / step + 0.01 * i})
        logger.close()
        names.append(f"{run.name}/tb")
    return names


def test_more_than_40_runs_open_empty_unless_the_printed_link_selects_them(
    browser, tmp_path, shots, capsys
):
    names = _many_runs(tmp_path / "many", 41)
    with tensorboard(tmp_path / "many", runs=41) as (base, server):
        printed = [server.stdout.readline() for _ in range(3)]
        link = next(x for x in printed if "custom scalars, every run selected:" in x)
        url = link.split("selected:")[1].strip()
        assert url.startswith(base + "#custom_scalars&runSelectionState=")

        # TensorBoard's own default: above 40 runs none is selected, every chart is empty
        state = load(
            browser,
            base + "#custom_scalars",
            CUSTOM_SCALARS,
            lambda s: len(s["runs"]) == 41 and _charts(s, TRAIN_BY_MODE),
            "the run selector",
        )
        screenshot(browser, shots, "custom_scalars_41_runs_default.png", capsys)
        assert state["selected"] == []
        assert _charts(state, TRAIN_BY_MODE)["mean-mean"]["series"] == []

        # a run filter that matches 40 runs or fewer selects all it matches
        state = load(
            browser,
            base + "#custom_scalars&regexInput=" + urllib.parse.quote("^[0-9]_", safe=""),
            CUSTOM_SCALARS,
            lambda s: len(_charts(s, TRAIN_BY_MODE).get("mean-mean", {}).get("series", [])) == 10,
            "10 series in the chart",
        )
        assert sorted(state["selected"]) == sorted(f"{i}_seed={i}/tb" for i in range(10))

        state = load(
            browser,
            url,
            CUSTOM_SCALARS,
            lambda s: len(_charts(s, TRAIN_BY_MODE).get("mean-mean", {}).get("series", [])) == 41,
            "41 series in the chart",
        )
        screenshot(browser, shots, "custom_scalars_41_runs.png", capsys)
        assert sorted(state["selected"]) == sorted(names)
        chart = _charts(state, TRAIN_BY_MODE)["mean-mean"]
        assert sorted(n.split(" (")[1].rstrip(")") for n, _ in chart["series"]) == sorted(names)
        assert all(points == 5 for _, points in chart["series"])
