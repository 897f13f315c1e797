import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model():
    from qwen_image import QwenImage

    return QwenImage.tiny(seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model):
    """A tiny model saved in diffusers layout (shared by tests that load from a path)."""
    path = tmp_path_factory.mktemp("tiny_ckpt")
    tiny_model.save_pretrained(path)
    return path

