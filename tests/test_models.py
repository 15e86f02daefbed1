"""GlobalBatchNorm in one process is plain batch norm; every model runs forward and backward."""

import pytest
import torch
from torch import nn

from ddp_reduce.data import load_dataset
from ddp_reduce.models import GlobalBatchNorm, build_model, loss_sums
from tests.helpers import config


@pytest.mark.parametrize(
    "shape,ref_cls", [((12, 5), nn.BatchNorm1d), ((6, 5, 3, 3), nn.BatchNorm2d)]
)
def test_global_batch_norm_alone_is_batch_norm(shape, ref_cls):
    torch.manual_seed(0)
    ours, ref = GlobalBatchNorm(5), ref_cls(5)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for _ in range(3):
        x = torch.randn(shape, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        y, y_ref = ours(x), ref(x2)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        (y * torch.arange(y.numel()).view(shape)).sum().backward()
        (y_ref * torch.arange(y.numel()).view(shape)).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    ours.eval(), ref.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        ("model=linear",),
        ("model=mlp", "model.batch_norm=true"),
        ("model=cnn", "model.batch_norm=true", "model.sync_bn=true"),
        ("data=linear", "model=linear"),
        ("data=sequences", "model=seq"),
        ("data=sequences", "model=seq", "model.arch=transformer"),
    ],
)
def test_models_run_and_loss_is_a_sum_over_items(overrides):
    cfg = config(*overrides)
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data)
    idx = torch.arange(6)
    batch = data.train.batch(idx)
    loss, _ = loss_sums(data.task, model(batch.x), batch)
    loss.backward()
    assert torch.isfinite(loss)
    # a sum: twice the same rows give twice the loss
    both = data.train.batch(torch.cat([idx, idx]))
    loss2, _ = loss_sums(data.task, model(both.x), both)
    torch.testing.assert_close(loss2, 2 * loss.detach(), rtol=1e-5, atol=1e-5)
