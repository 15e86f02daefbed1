"""The benchmark's machinery (not its timings): interleaving, paired ratios, verdicts, report."""

from __future__ import annotations

import pytest

from ddp_reduce.analysis.bench import (
    BARE,
    _cfg,
    _interleaved_job,
    paired_ratio,
    report,
    verdict,
)
from ddp_reduce.config import DistConfig
from ddp_reduce.run.pool import RankPool


def test_paired_ratio_and_verdict():
    base = [1.0, 2.0, 4.0, 1.0, 2.0]
    same = paired_ratio(base, base)
    assert same == {"ratio": 1.0, "low": 1.0, "high": 1.0}
    slower = paired_ratio([2 * x for x in base], base)
    assert slower["ratio"] == 2.0
    assert verdict(same, 1.02) == "yes"
    assert verdict(slower, 1.05) == "**no**"
    assert verdict({"ratio": 1.0, "low": 0.9, "high": 1.1}, 1.02) == "within noise"


def test_interleaved_job_times_every_variant_on_every_rank():
    cfgs = {
        "builtin": _cfg("cpu", "reduce.impl=builtin", "noise.enabled=false"),
        "mean + noise": _cfg("cpu", "noise.enabled=true"),
        BARE: _cfg("cpu", "noise.enabled=false"),
    }
    pool = RankPool(DistConfig(threads_per_rank=1), 2)
    try:
        results = pool.call(_interleaved_job, cfgs, 1, 3, 2)
    finally:
        pool.close()
    for r in results:
        assert set(r["wall"]) == set(cfgs) and set(r["cpu"]) == set(cfgs)
        assert all(len(v) == 3 and min(v) > 0 for v in r["wall"].values())


def test_report_renders_every_section():
    row = {
        "median_ms": 2.0,
        "steps": 10,
        "ratio": 1.01,
        "low": 0.99,
        "high": 1.03,
        "cpu_ratio": 1.0,
    }
    results = {
        "reduce": {
            "world_size": 2,
            "device": "cpu",
            "models": {"m": {"builtin": row, "mean": row}},
        },
        "scaling": {
            "cores": 2,
            "batches": {
                64: {
                    "items_per_s": {"a": 1.0, "b": 1.8, "c": 2.0},
                    "speedup_w2_over_w1": {"ratio": 1.8, "low": 1.7, "high": 1.9},
                    "w2_over_one_process_two_threads": {"ratio": 0.9, "low": 0.8, "high": 1.0},
                }
            },
        },
        "sweep": {
            "reuse_ranks": {
                "points": 16,
                "wall_s": 10.0,
                "training_s": 4.0,
                "overhead_per_point_s": 0.375,
            }
        },
        "memory": {
            "steps": 100,
            "warmup_steps": 10,
            "ranks": [
                {
                    "rss_after_warmup_mb": 100.0,
                    "rss_end_mb": 101.0,
                    "growth": 0.01,
                    "peak_rss_mb": 101.0,
                }
            ],
        },
    }
    text = report(results)
    assert (
        "| m | mean | 10 | 2.000 | 1.010 [0.990, 1.030] | 1.000 | <= 1.02 | within noise |" in text
    )
    assert "speed-up 1.80x [1.70, 1.90]" in text and "target >= 1.6x: yes" in text
    assert "| reuse_ranks | 16 | 10.0 | 4.0 | 0.38 |" in text
    assert "+1.00%" in text


@pytest.mark.parametrize("what", ["nonsense"])
def test_bench_refuses_unknown_benchmarks(what, capsys):
    from ddp_reduce.analysis.bench import main

    with pytest.raises(SystemExit) as exit_info:
        main([what])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_report_renders_the_targets_of_the_trainer_the_start_and_the_strategies():
    interval = {"ratio": 1.02, "low": 0.99, "high": 1.04}
    results = {
        "reduce": {
            "world_size": 2,
            "device": "cpu",
            "models": {},
            "trainer": {"m": {"mean + noise": interval, "mean + noise, never logged": interval}},
        },
        "startup": {
            "rounds": 3,
            "median_s": {"import floor": 1.0, "one-step run": 2.0},
            "ratio_to_floor": {"ratio": 2.0, "low": 1.9, "high": 2.6},
            "run_inside_ranks_s": 0.1,
            "calculator": {"convert": {"ratio": 0.05, "low": 0.04, "high": 0.06}},
        },
        "fsdp": {
            2: {
                "bytes": {
                    s: {"parameters": 2**20, "gradients": 2**20, "optimizer": 2**21}
                    for s in ("ddp", "fsdp")
                },
                "state_ratio": 0.5,
                "step_ratio": interval,
                "median_step_ms": {"ddp": 1.0, "fsdp": 2.0},
                "layer_over_alone": interval,
                "layer_route": "fsdp_comm",
            }
        },
        "precision": {
            "world_size": 2,
            "device": "cpu",
            "median_ms": {"fp32": 2.0, "bf16": 1.9},
            "ratios": {"bf16": interval},
        },
    }
    text = report(results)
    assert "| m | mean + noise | 1.020 [0.990, 1.040] | <= 1.03 | within noise |" in text
    # the target is the defaults' only: the other rows say what logging and the noise add
    assert "| m | mean + noise, never logged | 1.020 [0.990, 1.040] |  |  |" in text
    assert "FSDP2 alone (its divide factor W, the same c = 1): 1.020 [0.990, 1.040]" in text
    assert "2.00x [1.90, 2.60] (target <= 2.5: within noise)" in text
    assert "| convert | 0.050 [0.040, 0.060] | <= 0.3 | yes |" in text
    assert "state fsdp/ddp 0.500 (1/W = 0.500)" in text
    assert "| bf16 | 1.900 | 1.020 [0.990, 1.040] |" in text


def test_report_renders_hsdp_state_beside_ddp_and_fsdp():
    interval = {"ratio": 1.5, "low": 1.4, "high": 1.6}
    mib = {"parameters": 2**20, "gradients": 2**20, "optimizer": 2**21}
    results = {
        "fsdp": {
            4: {
                "bytes": {"ddp": mib, "fsdp": mib, "hsdp": mib},
                "state_ratio": 0.25,
                "hsdp_state_ratio": 0.5,
                "step_ratio": interval,
                "median_step_ms": {"ddp": 1.0, "fsdp": 2.0, "hsdp": 1.5},
            }
        }
    }
    text = report(results)
    assert "| 4 | hsdp | 1.0 | 1.0 | 2.0 | 1.5 |" in text
    assert "state hsdp/ddp 0.500 with R=2 replicas of S=2 shards (1/S = 0.500)" in text
