from __future__ import annotations

from pathlib import Path

import pytest

from tiny import build_tokenizer, save_tiny

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
    rm_args = [
        "train-rm",
        f"model={tiny_model_dir}",
        f"data={data}",
        "data.max_length=64",
        "data.max_prompt_length=32",
        "data.test_size=6",
        "optim.max_steps=4",
        "optim.learning_rate=3e-3",
        f"output_dir={root / 'rm'}",
        "progress_bar=false",
        "tensorboard=false",
    ]
    assert iopo_main(rm_args) == 0
    return {"root": root, "data": data, "base": tiny_model_dir, "rm": root / "rm" / "final"}


@pytest.fixture()
def accelerator():
    """A one-process CPU accelerator (the engine tests build players and steps on it)."""
    from accelerate import Accelerator

    return Accelerator(cpu=True)
