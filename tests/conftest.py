import os

# Tests never touch the network and never prompt for a W&B login.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from train.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (ChatML template, pad != eos) saved once per test session."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), seed=0))
