"""The shared cosine LR schedules: the project default (no zero-LR epochs) and the upstream curve (R10)."""
import math

import pytest
import torch

from cnn.training import TrainingConfig, learning_rate
from ohlora.schedules import SCHEDULES, cosine_lr, lr_factor, set_epoch_lr


def torch_upstream_lrs(base_lr, t_max, epochs):
    """What upstream's scheduler gives: CosineAnnealingLR(T_max, eta_min=0) stepped once per epoch, never reset."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=base_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=0)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    return lrs


def test_upstream_schedule_is_torchs_cosine_annealing_stepped_past_t_max():
    ours = [cosine_lr(5e-5, epoch, 10, 'upstream') for epoch in range(65)]
    assert ours == pytest.approx(torch_upstream_lrs(5e-5, 10, 65), abs=1e-15)
    assert [ours[e] for e in (10, 30, 50)] == [0.0, 0.0, 0.0]  # the zero-LR epochs of R10
    assert ours[20] == pytest.approx(5e-5) and ours[40] == pytest.approx(5e-5)
    # v2's generator phase: T_max 20 per step group
    assert [cosine_lr(1e-5, g, 20, 'upstream') for g in range(45)] == pytest.approx(
        torch_upstream_lrs(1e-5, 20, 45), abs=1e-15)


def test_default_schedule_restarts_and_never_reaches_zero():
    default = [lr_factor(epoch) for epoch in range(200)]
    assert default[:10] == [lr_factor(epoch, schedule='upstream') for epoch in range(10)]
    assert default[10:20] == default[:10] and default[190:] == default[:10]
    assert min(default) == pytest.approx((1 + math.cos(math.pi * 9 / 10)) / 2)
    assert min(default) > 0.02
    assert default[0] == 1.0 and default[5] == pytest.approx(0.5)
    assert lr_factor(3, period=4) == pytest.approx((1 + math.cos(3 * math.pi / 4)) / 2)
    assert lr_factor(4, period=4) == 1.0 and lr_factor(4, period=4, schedule='upstream') == 0.0


def test_stage2_learning_rates_are_bit_identical_to_the_inline_formula():
    # The formula stage 2 used before the schedule moved to ohlora.schedules.
    def before(lr, period, schedule, epoch):
        phase = epoch if schedule == 'upstream' else epoch % period
        return lr * (1.0 + math.cos(math.pi * phase / period)) / 2.0

    for schedule in SCHEDULES:
        for lr, period in ((5e-5, 10), (3e-4, 7), (1e-3, 1)):
            config = TrainingConfig(lr=lr, cosine_period=period, schedule=schedule)
            assert [learning_rate(config, e) for e in range(120)] == [before(lr, period, schedule, e)
                                                                      for e in range(120)]


def test_param_groups_get_their_own_base_lr_times_the_factor():
    generator, encoder = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW([{'params': generator.parameters(), 'lr': 1e-4},
                                   {'params': encoder.parameters(), 'lr': 1e-5}])
    lrs = set_epoch_lr(optimizer, [1e-4, 1e-5], 5)
    assert lrs == [pytest.approx(5e-5), pytest.approx(5e-6)]
    assert [g['lr'] for g in optimizer.param_groups] == lrs
    set_epoch_lr(optimizer, [1e-4, 1e-5], 10, schedule='upstream')
    assert [g['lr'] for g in optimizer.param_groups] == [0.0, 0.0]
    with pytest.raises(ValueError, match='2 param groups'):
        set_epoch_lr(optimizer, [1e-4], 0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match='schedule must be one of'):
        cosine_lr(1e-4, 0, 10, 'cosine')
    with pytest.raises(ValueError, match='schedule must be one of'):
        TrainingConfig(schedule='warm')
    with pytest.raises(ValueError, match='period must be at least 1'):
        lr_factor(0, period=0)
    with pytest.raises(ValueError):
        lr_factor(-1)
