from __future__ import annotations

from pathlib import Path

import pytest

from tiny import build_tokenizer, save_tiny, train_rm_args

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random LlamaForCausalLM + tokenizer with a ChatML chat template."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir):
    """The online tests' data, and a reward model trained for a few steps on it (the judge)."""
    from iopo.cli import main as iopo_main

    from tiny import write_pairs

    root = tmp_path_factory.mktemp("online")
    data = write_pairs(root / "pairs.jsonl", n=36)
    assert iopo_main(train_rm_args(tiny_model_dir, data, root / "rm")) == 0
    return {"root": root, "data": data, "base": tiny_model_dir, "rm": root / "rm" / "final"}


@pytest.fixture()
def accelerator():
    """A one-process CPU accelerator (the engine tests build players and steps on it)."""
    from accelerate import Accelerator

    return Accelerator(cpu=True)
