import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from shira_diffusion import find_targets
from shira_diffusion.testing import tiny_sdxl_pipeline, tiny_sdxl_unet

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_unet():
    """A fresh tiny SDXL-architecture UNet (96 attention projections)."""
    return tiny_sdxl_unet(seed=0)


@pytest.fixture
def unet_targets(tiny_unet):
    return find_targets({"unet": tiny_unet})


@pytest.fixture(scope="session")
def tiny_pipe():
    return tiny_sdxl_pipeline(seed=0)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert state.keys() == expected.keys()
    changed = [k for k in state if not torch.equal(state[k], expected[k])]
    assert not changed, f"{len(changed)} tensors differ, e.g. {changed[:3]}"
