"""config.py and the CLI's config handling: precedence, shorthands, named errors, every shipped preset loads."""

from pathlib import Path

import pytest
import yaml

from iopo.cli import main
from iopo.config import ConfigError, TrainConfig, load_config, parse_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_paper_hyperparameters():
    cfg = TrainConfig()
    assert cfg.method == "iopo"
    assert cfg.loss.beta == 0.1 and cfg.iopo.epsilon == 0.3
    assert (cfg.iopo.adversary, cfg.iopo.is_clip, cfg.iopo.is_logp) == ("symmetric", "paper", "sum")
    assert cfg.model.name_or_path is None and cfg.data.path is None  # the embedded model and data


def test_precedence_defaults_file_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: dpo\noptim:\n  learning_rate: 1.0e-6\n  batch_size: 2\nloss: {beta: 0.5}\n")
    cfg = load_config(path, ["optim.learning_rate=3e-6", "iopo.n_mu=4", "model.lora=true"])
    assert cfg.method == "dpo"  # file
    assert cfg.optim.batch_size == 2  # file
    assert cfg.optim.learning_rate == 3e-6  # override beats file
    assert cfg.loss.beta == 0.5
    assert cfg.iopo.n_mu == 4 and cfg.model.lora is True
    assert cfg.optim.weight_decay == 0.0  # default


def test_shorthands_and_paths_stay_strings():
    cfg = load_config(None, ["model=some/model", "data=123", "model.lora=true", "output_dir=007"])
    assert cfg.model.name_or_path == "some/model" and cfg.model.lora
    assert cfg.data.path == "123" and cfg.output_dir == "007"


def test_shorthand_in_any_order_keeps_sub_keys():
    for order in (["model.lora=true", "model=m"], ["model=m", "model.lora=true"]):
        cfg = load_config(None, [*order, "data.max_length=999", "data=d.jsonl"])
        assert cfg.model.name_or_path == "m" and cfg.model.lora is True
        assert cfg.data.path == "d.jsonl" and cfg.data.max_length == 999


def test_column_mapping_override():
    cfg = load_config(None, ["data.columns={chosen: response.0, rejected: response.1}"])
    assert cfg.data.columns == {"chosen": "response.0", "rejected": "response.1"}


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["optim.learning_rat=1"], "unknown key 'optim.learning_rat'"),
        (["bogus=1"], "unknown key 'bogus'"),
        (["optim.learning_rate=fast"], "'optim.learning_rate'"),
        (["method=ppo"], "'method'"),
        (["iopo.epsilon=1.5"], "'iopo.epsilon'"),
        (["iopo.is_clip=hard"], "'iopo.is_clip'"),
        (
            ["data.max_prompt_length=600", "data.max_length=512"],
            "max_prompt_length (600) must be below max_length",
        ),
        (["optim.batch_size"], "not key=value"),
        (["optim.batch_size.x=1"], "'optim.batch_size'"),
        (["optim.batch_size=1", "optim.batch_size.x=1"], "not a section"),
    ],
)
def test_errors_name_the_key(overrides, named):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert named in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_file_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: [dpo\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listy)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"bad config \(.*unknown.yaml\): unknown key 'optim.lr'"):
        load_config(unknown)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """Each preset opens with the command that runs it, and loads with that command's config."""
    from iopo.cli import COMMANDS

    first = path.read_text().splitlines()[0]
    import re

    found = re.match(r"# Run.*?\biopo ([a-z-]+)", first)
    assert found, "each preset opens with the command that runs it"
    command = found.group(1)
    cfg = load_config(path, schema=COMMANDS[command].schema)
    if command == "train":
        assert cfg.method in path.stem or path.stem in ("quickstart", "paper")


def test_paper_preset_matches_the_paper():
    cfg = load_config(CONFIGS / "paper.yaml")
    assert cfg.optim.learning_rate == 2e-7 and cfg.loss.beta == 0.1 and cfg.iopo.epsilon == 0.3
    assert "Baichuan2-7B" in cfg.model.name_or_path
    # Full fine-tuning of two 7B players is sharded; the launch line's GPUs make the paper's batch of 32.
    import re

    assert cfg.distributed.strategy == "fsdp" and not cfg.model.lora and cfg.mixed_precision == "bf16"
    launch = (CONFIGS / "paper.yaml").read_text().splitlines()[0]
    gpus = int(re.search(r"--nproc_per_node (\d+)", launch).group(1))
    assert cfg.optim.batch_size * cfg.optim.gradient_accumulation_steps * gpus == 32
    accelerate = yaml.safe_load((CONFIGS / "accelerate" / "fsdp.yaml").read_text())
    assert accelerate["num_processes"] == gpus and accelerate["distributed_type"] == "MULTI_GPU"


def test_parse_overrides_types():
    tree = parse_overrides(["a.b=1", "a.c=true", "a.d=1e-3", "a.e=hello", "a.f=null"])
    assert tree == {"a": {"b": 1, "c": True, "d": 1e-3, "e": "hello", "f": None}}


def test_cli_print_config(capsys, tmp_path):
    assert main(["train", "--print-config", "method=hinge", "loss.beta=0.2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"] == "hinge" and printed["loss"]["beta"] == 0.2
    assert TrainConfig.model_validate(printed).method == "hinge"  # the dump round-trips


def test_cli_bad_override_is_one_line(capsys):
    assert main(["train", "optim.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("iopo: error: ") and err.count("\n") == 1 and "optim.nope" in err


def test_hostile_config_files_and_values_are_one_bounded_line(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("method: iopo\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin1)
    for bad in ("seed=-1", "seed=99999999999", "data.split_seed=4294967296"):
        with pytest.raises(ConfigError, match="seed"):
            load_config(None, [bad])
    huge = "x" * 100_000
    with pytest.raises(ConfigError) as caught:
        load_config(None, [f"loss.beta={huge}"])
    assert len(str(caught.value)) < 1200 and "\n" not in str(caught.value)
    bomb = tmp_path / "bomb.yaml"  # a YAML alias bomb (~10^6 leaves from a few hundred bytes)
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for i, name in enumerate("bcdef"):
        prev = "abcdef"[i]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 10) + "]")
    lines.append("method: *f")
    bomb.write_text("\n".join(lines))
    with pytest.raises(ConfigError) as caught:
        load_config(bomb)
    assert len(str(caught.value)) < 1200


def test_a_setting_added_after_a_run_was_written_does_not_block_its_resumption():
    from iopo.config import TrainConfig, changed_settings

    cfg = TrainConfig()
    saved = cfg.model_dump(mode="json")
    del saved["model"]["disable_dropout"]  # a checkpoint written before the setting existed
    del saved["eval_steps"]
    assert changed_settings(saved, cfg) == []
    off = cfg.model_copy(update={"model": cfg.model.model_copy(update={"disable_dropout": False})})
    assert changed_settings(saved, off) == ["model.disable_dropout (was None, now False)"]
    lr = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"learning_rate": 1e-3})})
    assert changed_settings(cfg.model_dump(mode="json"), lr) == ["optim.learning_rate (was 5e-06, now 0.001)"]


def test_an_override_with_a_colon_is_text_and_braces_make_a_mapping():
    from iopo.config import ReportConfig

    cfg = load_config(None, ["title=iopo online: Iter-DPO vs IOPO"], ReportConfig)
    assert cfg.title == "iopo online: Iter-DPO vs IOPO"
    data = load_config(None, ["data.columns={chosen: response.0, rejected: response.1}"])
    assert data.data.columns == {"chosen": "response.0", "rejected": "response.1"}


def test_mixed_precision_no_is_no_on_the_command_line_and_in_yaml(tmp_path):
    """YAML 1.1 reads a bare `no` as false: `mixed_precision=no` and `mixed_precision: no` still mean "no"."""
    from iopo.config import TrainRMConfig, load_config

    assert load_config(None, ["mixed_precision=no"]).mixed_precision == "no"
    assert load_config(None, ["mixed_precision=no"], TrainRMConfig).mixed_precision == "no"
    (tmp_path / "c.yaml").write_text("mixed_precision: no\n")
    assert load_config(tmp_path / "c.yaml", []).mixed_precision == "no"
