"""Training noise levels: the Qwen shift comes from the loaded scheduler's config and matches the sampler's."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from align.losses import sample_sigmas
from qwen_image.scheduler import QWEN_IMAGE_SCHEDULER_CONFIG, shift_mu


@pytest.mark.parametrize("max_shift", [0.9, 1.5])
def test_qwen_shift_uses_the_schedulers_config_and_matches_inference(max_shift):
    # No terminal stretch, so set_timesteps(sigmas=u, mu) is exactly the shift applied to u.
    config = {**QWEN_IMAGE_SCHEDULER_CONFIG, "max_shift": max_shift, "shift_terminal": None}
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    seq_len = 1024
    sigma = sample_sigmas(64, "qwen_shift", image_seq_len=seq_len, scheduler=scheduler,
                          generator=torch.Generator().manual_seed(0))
    u = torch.rand(64, generator=torch.Generator().manual_seed(0)).clamp(1e-5, 1 - 1e-5)
    order = torch.argsort(u, descending=True)
    scheduler.set_timesteps(sigmas=u[order].numpy(), mu=shift_mu(scheduler, seq_len))
    np.testing.assert_allclose(sigma[order].numpy(), scheduler.sigmas[:-1].numpy(), rtol=1e-5)
    assert (sigma > u).all()  # mu > 0 at this size: the shift moves training towards noise, as at inference


def test_qwen_shift_grows_with_image_size_and_needs_a_scheduler():
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)
    small, large = (sample_sigmas(256, "qwen_shift", image_seq_len=n, scheduler=scheduler,
                                  generator=torch.Generator().manual_seed(1)) for n in (256, 4096))
    assert (large > small).all()
    with pytest.raises(ValueError, match="needs the model's scheduler"):
        sample_sigmas(2, "qwen_shift")


def test_seeded_density_schemes_repeat_and_stay_in_range():
    for scheme in ("uniform", "logit_normal", "mode"):
        a, b = (sample_sigmas(32, scheme, generator=torch.Generator().manual_seed(3)) for _ in range(2))
        assert torch.equal(a, b) and ((a > 0) & (a < 1)).all()
