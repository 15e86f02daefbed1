"""Data paths: the DataLoader path serves exactly the in-memory path's batches; the sampler as a
``torch.utils.data`` sampler; the text workload is ragged on real data."""

from __future__ import annotations

import pytest
import torch

from ddp_reduce import rank_batch_sampler
from ddp_reduce.config import ConfigError, DataConfig, LastBatch
from ddp_reduce.data import GlobalBatchSampler, load_dataset
from ddp_reduce.models import build_model, loss_sums
from tests.helpers import config, config_dict, spawn, train_runs

RUN = ("train.steps=20", "train.eval_every=0", "train.log_every=5")


def test_the_rank_sampler_yields_the_global_batch_slices():
    sampler = GlobalBatchSampler(100, 16, 3, LastBatch.drop)
    for rank in range(2):
        got = list(
            rank_batch_sampler(100, 16, rank=rank, world_size=2, accum_steps=2, steps=3, seed=3)
        )
        want = [i.tolist() for t in range(3) for i in sampler.micro_batches(t, rank, 2, 2)]
        assert got == want and len(got) == 6
    with pytest.raises(ValueError, match="multiple of world_size"):
        rank_batch_sampler(100, 15, rank=0, world_size=2, steps=1)


@pytest.mark.parametrize(
    "extra",
    [(), ("data=sequences", "model=seq", "reduce.loss=sum", "reduce.op=global_mean")],
    ids=["digits", "sequences-global_mean"],
)
def test_the_dataloader_path_trains_the_same_weights(tmp_path, extra):
    jobs = [
        (config_dict(*RUN, *extra, f"data.loader={kind}", *workers), str(tmp_path / kind))
        for kind, workers in (("memory", ()), ("loader", ("data.num_workers=2",)))
    ]
    summaries = spawn(train_runs, 2, tmp_path, jobs)[0]
    assert all(s["status"] == "completed" for s in summaries)
    a = torch.load(tmp_path / "memory" / "model.pt")
    b = torch.load(tmp_path / "loader" / "model.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_text_documents_are_ragged_and_the_mean_of_means_is_biased():
    cfg = config("data=text", "model=seq", "data.max_documents=1000")
    data = load_dataset(cfg.data)
    lengths = data.train.lengths.float()
    assert lengths.std() / lengths.mean() > 0.3  # documents of very different lengths
    torch.manual_seed(0)
    model = build_model(cfg.model, data)

    def grad(idx):
        model.zero_grad()
        batch = data.train.batch(idx)
        loss, _ = loss_sums(data.task, model(batch.x), batch)
        (loss / data.train.items(idx)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    idx = torch.arange(16)
    g = grad(idx)
    mean_of_means = (grad(idx[:8]) + grad(idx[8:])) / 2
    assert ((mean_of_means - g).norm() / g.norm()).item() > 1e-3


@pytest.mark.parametrize(
    "option,key",
    [({"root": "/nonexistent/folder"}, "data.root"), ({"pattern": "*.nothing"}, "data.pattern")],
)
def test_text_data_refuses_a_folder_or_pattern_without_text(option, key):
    cfg = DataConfig(name="text", **option)
    with pytest.raises(ConfigError) as err:
        load_dataset(cfg)
    assert err.value.key == key
