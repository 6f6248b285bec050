"""The resolution shift draws the sigmas the base's scheduler samples: its constants and its time_shift_type."""
from __future__ import annotations

import math

import pytest
import torch

from finetune.models.flow_matching import from_recipe


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
def test_the_resolution_shift_is_the_schedulers_own(time_shift_type):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=time_shift_type,
                                                base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                                max_image_seq_len=8192)
    flow = {"sigma_sampling": "uniform", "shift": None, "resolution_shift": True, "logit_mean": 0.0,
            "logit_std": 1.0, "mode_scale": 1.29, "sigmoid_scale": 1.0, "weighting": "none"}
    objective = from_recipe(flow, {}, scheduler.config)
    u = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    mu = objective.resolution_shift.mu(128, 128)  # 64 x 64 = 4096 tokens at patch 2
    assert math.isclose(mu, 0.5 + 0.4 * (4096 - 256) / (8192 - 256))
    expected = scheduler.time_shift(mu, 1.0, u)
    torch.testing.assert_close(objective.shifted(u, 128, 128), expected)
