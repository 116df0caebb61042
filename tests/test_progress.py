"""Progress where a person waits: the starting model's log-probs, the steps, the final evaluation (iopo train), the
steps and the held-out scoring (iopo train-rm), and each checkpoint said with its seconds."""

from __future__ import annotations

from iopo.cli import main

from tiny import run_overrides, write_pairs


def test_train_and_train_rm_show_a_bar_for_each_long_phase(tmp_path, tiny_model_dir, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", n=24)
    args = run_overrides(
        tiny_model_dir, data, tmp_path / "run", "method=dpo", "optim.max_steps=2", "eval_steps=1"
    )
    assert main(["train", *args, "progress_bar=true"]) == 0
    captured = capsys.readouterr()
    said = captured.err + captured.out
    for label in (
        "log-probs start",
        "dpo:",
        "eval at step 1",
        "eval policy",
        "saving the checkpoint of step 2",
    ):
        assert label in said, label
    assert "checkpoint at step 2" in said  # and when it is written, with its seconds
    # iopo eval of that run: a bar for the baseline's log-probs (the policy's are read from the run) and for each
    # model's answers
    ev = ["eval", str(tmp_path / "run"), "generation.max_new_tokens=2", f"output_dir={tmp_path / 'ev'}"]
    assert main([*ev, "progress_bar=true", "bootstrap=20"]) == 0
    captured = capsys.readouterr()
    said = captured.err + captured.out
    assert "generate run:" in said and "reused" in said
    rm = [
        "train-rm",
        f"model={tiny_model_dir}",
        f"data={data}",
        "data.max_length=64",
        "data.max_prompt_length=32",
    ]
    rm += ["data.test_size=6", "optim.max_steps=2", f"output_dir={tmp_path / 'rm'}", "tensorboard=false"]
    assert main([*rm, "progress_bar=true"]) == 0
    captured = capsys.readouterr()
    said = captured.err + captured.out
    assert "train-rm:" in said and "held-out pairs:" in said
