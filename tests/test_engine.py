"""iopo.engine (players, session, fit) and `iopo train`: the schedule, who changes in a phase, per-player optimizer
state, baselines, resume and export."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from iopo.commands.train import train
from iopo.config import ConfigError, load_config
from iopo.core.logprobs import sequence_logps
from iopo.core.methods import METHODS, iopo_schedule
from iopo.data.collate import collate_pairs
from iopo.data.loading import load_training_data
from iopo.engine import fit as fit_module
from iopo.engine.fit import fit, train_step
from iopo.engine.players import build_players, player_logps
from iopo.engine.session import (
    agent_loss,
    build_schedule,
    make_optimizer,
    micro_batch_indices,
    open_accelerator,
    open_session,
    open_tokenizer,
)
from iopo.io.models import load_tokenizer
from iopo.io.runlog import MEMORY_TRACE

from tiny import kill_9_when, make_cfg, run_overrides, train_records, write_pairs


def setup_players(cfg, accelerator):
    tokenizer = load_tokenizer(cfg.model)
    train_pairs, _, _ = load_training_data(cfg.data, tokenizer, None)
    players, reference, _ = build_players(cfg, METHODS[cfg.method], accelerator, None)
    for p in players.values():
        p.optimizer = accelerator.prepare_optimizer(make_optimizer(p.params, cfg))
    batch = collate_pairs(train_pairs[:4], tokenizer.pad_token_id)
    return players, reference, batch


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


def iopo_loss_fn(cfg, agent="protagonist"):
    return agent_loss(cfg, agent)


# ---------------------------------------------------------------- schedule and data order


def test_iopo_schedule_alternates_as_configured():
    assert iopo_schedule(2, 2, 1) == [
        ("protagonist", 0),
        ("protagonist", 0),
        ("adversary", 0),
        ("protagonist", 1),
        ("protagonist", 1),
        ("adversary", 1),
    ]


def test_build_schedule_covers_epochs(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, "iopo.n_mu=2", "iopo.n_nu=1", "optim.num_epochs=2")
    # 20 train pairs / (4 pairs x 1 micro-batch) = 5 steps per epoch -> 10 steps -> ceil(10 / 3) = 4 rounds.
    schedule = build_schedule(cfg, n_train=20, global_batch=4)
    assert len(schedule) == 12 and schedule[-1] == ("adversary", 3)
    dpo = make_cfg(tmp_path, tiny_model_dir, "optim.max_steps=7", method="dpo")
    assert build_schedule(dpo, n_train=20, global_batch=4) == [("policy", 0)] * 7


def test_micro_batches_walk_seeded_epoch_permutations():
    n, g = 10, 4
    first_epoch = [i for pos in range(2) for i in micro_batch_indices(pos, g, n, seed=1)]
    assert len(set(first_epoch)) == 8  # no repeats inside an epoch
    stream = [i for pos in range(5) for i in micro_batch_indices(pos, g, n, seed=1)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream == [i for pos in range(5) for i in micro_batch_indices(pos, g, n, seed=1)]
    assert stream != [i for pos in range(5) for i in micro_batch_indices(pos, g, n, seed=2)]


# ---------------------------------------------------------------- one step: who changes


def test_full_iopo_step_changes_only_the_agent(tmp_path, tiny_model_dir, accelerator):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    players, reference, batch = setup_players(cfg, accelerator)
    assert reference is None
    protagonist, adversary = players["protagonist"], players["adversary"]
    before_p, before_a = snapshot(protagonist.module), snapshot(adversary.module)

    metrics = train_step(protagonist, adversary, players, [batch], iopo_loss_fn(cfg), accelerator, 1.0)
    assert changed(before_p, protagonist.module) == set(before_p)  # every protagonist weight moved
    assert changed(before_a, adversary.module) == set()  # the env is untouched
    assert all(p.grad is None for p in adversary.params)
    # The agent's gradients are freed after its update, not kept until its next step.
    assert all(p.grad is None for p in protagonist.params)
    # Step one: mu == nu, so h = 0 and the loss is mean(w) * ln 2.
    assert metrics["loss"] == pytest.approx(metrics["is/weight_mean"] * math.log(2), rel=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)

    # Now the adversary's phase: only it moves, the protagonist keeps its new weights.
    before_p, before_a = snapshot(protagonist.module), snapshot(adversary.module)
    metrics = train_step(adversary, protagonist, players, [batch], iopo_loss_fn(cfg), accelerator, 1.0)
    assert changed(before_p, protagonist.module) == set()
    assert changed(before_a, adversary.module) == set(before_a)
    assert metrics["loss"] != pytest.approx(metrics["is/weight_mean"] * math.log(2), rel=1e-5)  # h != 0 now

    # Each player keeps its own AdamW state across phases.
    train_step(protagonist, adversary, players, [batch], iopo_loss_fn(cfg), accelerator, 1.0)
    p_state = protagonist.optimizer.state_dict()["state"]
    a_state = adversary.optimizer.state_dict()["state"]
    assert {float(s["step"]) for s in p_state.values()} == {2.0}
    assert {float(s["step"]) for s in a_state.values()} == {1.0}


def test_lora_iopo_two_adapters_on_one_frozen_base(tmp_path, tiny_model_dir, accelerator):
    cfg = make_cfg(tmp_path, tiny_model_dir, "model.lora=true", "model.lora_r=4")
    players, _, batch = setup_players(cfg, accelerator)
    protagonist, adversary = players["protagonist"], players["adversary"]
    assert protagonist.module is adversary.module  # one shared model
    before = snapshot(protagonist.module)

    metrics = train_step(protagonist, adversary, players, [batch], iopo_loss_fn(cfg), accelerator, 1.0)
    moved = changed(before, protagonist.module)
    assert moved and all(".protagonist." in n and "lora_" in n for n in moved)
    assert not any(".adversary." in n for n in moved)
    assert not any("lora_" not in n for n in moved)  # the base is frozen
    # LoRA B starts at zero, so both adapters equal the base at step one: loss = mean(w) ln 2.
    assert metrics["loss"] == pytest.approx(metrics["is/weight_mean"] * math.log(2), rel=1e-5)
    assert sum(p.numel() for p in protagonist.params) < 0.5 * sum(
        p.numel() for p in protagonist.module.parameters()
    )

    before = snapshot(protagonist.module)
    train_step(adversary, protagonist, players, [batch], iopo_loss_fn(cfg), accelerator, 1.0)
    moved = changed(before, protagonist.module)
    assert moved and all(".adversary." in n for n in moved)


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_a_step_is_the_same_however_its_pairs_are_split_into_micro_batches(tmp_path, tiny_model_dir, method):
    """One step over 4 pairs in one micro-batch, and over the same 4 pairs in two micro-batches of 2, computes the
    same loss and moves the weights the same: DPO's mean over pairs, and SFT's mean over every chosen token of
    the step (a mean of the two micro-batches' token means would not be: their token counts differ)."""
    cfg = make_cfg(tmp_path, tiny_model_dir, method=method)
    tokenizer = load_tokenizer(cfg.model)
    pairs, _, _ = load_training_data(cfg.data, tokenizer, None)
    pairs = sorted(pairs, key=lambda p: len(p.chosen_ids))[-4:]  # chosen lengths differ between the halves
    halves = [sum(len(p.chosen_ids) for p in pairs[:2]), sum(len(p.chosen_ids) for p in pairs[2:])]
    assert halves[0] != halves[1]
    pad = tokenizer.pad_token_id
    after, losses = [], []
    for micro_batches in (
        [collate_pairs(pairs, pad)],
        [collate_pairs(pairs[:2], pad), collate_pairs(pairs[2:], pad)],
    ):
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        players, reference, _ = build_players(cfg, METHODS[method], accelerator, None)
        policy = players["policy"]
        policy.optimizer = torch.optim.SGD(policy.params, lr=1.0)  # the update is the gradient itself
        metrics = train_step(
            policy,
            reference,
            players,
            micro_batches,
            agent_loss(cfg, "policy"),
            accelerator,
            None,
            METHODS[method].reduce,
        )
        losses.append(metrics["loss"])
        after.append({n: p.detach().clone() for n, p in policy.module.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name in after[0]:
        torch.testing.assert_close(after[0][name], after[1][name], atol=1e-6, rtol=1e-4)


def test_per_pair_weights_make_a_weighted_mean_over_the_step():
    """Losses [1, 3] and [5] weighted [1, 0] and [2]: (1*1 + 0*3 + 2*5) / (1 + 0 + 2) = 11/3 over the step; without
    weights, the plain mean of each micro-batch (the step averages them); SFT's denominator is the chosen tokens."""
    from iopo.engine.fit import reduce_losses, step_denominator

    class One:
        num_processes = 1

    batches = [{"weight": torch.tensor([1.0, 0.0])}, {"weight": torch.tensor([2.0])}]
    total = step_denominator(One(), batches, "pairs")
    assert total == 3.0
    parts = [
        reduce_losses(torch.tensor(v), b, total, 1) for v, b in zip(([1.0, 3.0], [5.0]), batches, strict=True)
    ]
    assert float(sum(parts)) == pytest.approx(11 / 3)
    assert step_denominator(One(), [{}, {}], "pairs") is None
    assert float(reduce_losses(torch.tensor([1.0, 3.0]), {}, None, 1)) == 2.0
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[0, 0:3] = True  # chosen of pair 1: positions 1 and 2 are predicted (position 0 is no target)
    mask[1, 3:5] = True  # chosen of pair 2: 2 tokens
    mask[2:, 1:5] = True  # rejected: not counted
    assert (
        step_denominator(One(), [{"completion_mask": mask, "input_ids": torch.zeros(4, 5)}], "chosen_tokens")
        == 4
    )


@pytest.mark.parametrize("method", ["dpo", "ipo", "hinge", "kto_pair", "sft"])
@pytest.mark.parametrize("lora", [False, True])
def test_baseline_step_moves_policy_not_reference(tmp_path, tiny_model_dir, accelerator, method, lora):
    cfg = make_cfg(tmp_path, tiny_model_dir, f"model.lora={str(lora).lower()}", method=method)
    players, reference, batch = setup_players(cfg, accelerator)
    policy = players["policy"]
    assert (reference is None) == (method == "sft")
    before_policy = snapshot(policy.module)
    before_ref = snapshot(reference.module) if reference is not None and not lora else None
    if reference is not None:
        ref_logps = player_logps(reference, batch, players, grad=False)
    loss_fn = agent_loss(cfg, "policy")
    metrics = train_step(
        policy, reference, players, [batch], loss_fn, accelerator, 1.0, METHODS[method].reduce
    )
    assert changed(before_policy, policy.module)
    if before_ref is not None:
        assert changed(before_ref, reference.module) == set()
    if reference is not None:  # the reference computes the same log-probs after the step (LoRA: adapters off)
        after = player_logps(reference, batch, players, grad=False)
        torch.testing.assert_close(after["chosen_logps"], ref_logps["chosen_logps"])
        assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step one
    assert math.isfinite(metrics["loss"])


# ---------------------------------------------------------------- whole runs


def _final_weights(run_dir):
    return load_file(run_dir / "final" / "model.safetensors")


def test_run_writes_metrics_checkpoints_export_eval(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, "iopo.n_iter=2", "iopo.n_mu=2", "iopo.n_nu=1", "save_steps=2")
    results = train(cfg)
    run = cfg.run_dir
    records = train_records(run)
    assert [r["agent"] for r in records] == ["protagonist", "protagonist", "adversary"] * 2
    assert [r["step"] for r in records] == list(range(1, 7))
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "is/weight_mean",
        "is/weight_min",
        "is/weight_max",
        "is/capped_frac",
        "is/guarded_frac",
        "loss",
        "grad_norm",
        "learning_rate",
        "round",
    ):
        assert key in records[0], key
    assert records[0]["loss"] == pytest.approx(records[0]["is/weight_mean"] * math.log(2), rel=1e-5)
    # save_total_limit=2 keeps the two newest: step 4 and the final step 6.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]
    last = run / "checkpoints" / "step-0000006"
    for name in ("protagonist", "adversary"):
        assert (last / name / "config.json").is_file()
        assert (last / f"{name}.optimizer.pt").is_file() and (last / f"{name}.scheduler.pt").is_file()
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 6
    assert (last / "config.yaml").is_file() and (last / "rng_state_0.pt").is_file()
    # eval.json holds the paper's two offline metrics for the protagonist vs the starting model.
    saved = json.loads((run / "eval.json").read_text())
    assert saved["n_pairs"] == 4 and saved["player"] == "protagonist"
    assert saved["pairwise_accuracy"] == results["pairwise_accuracy"]
    assert saved["margin_reward"] == pytest.approx(sum(saved["margins"]) / 4, abs=1e-5)


def test_memory_trace_marks_every_phase_in_order(tmp_path, tiny_model_dir, monkeypatch):
    """IOPO_MEMORY_TRACE=<file>: one JSON line per phase entered, with the RSS and its high-water mark."""
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv(MEMORY_TRACE, str(trace))
    cfg = make_cfg(tmp_path, tiny_model_dir, "iopo.n_iter=1", "iopo.n_mu=1", "iopo.n_nu=1", "eval_steps=1")
    train(cfg)
    marks = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [m["phase"] for m in marks] == [
        "load",
        "reference log-probs",
        "train step 1 (protagonist)",
        "eval at step 1",
        "train step 2 (adversary)",
        "checkpoint",
        "export",
        "eval at step 2",
        "done",
    ]
    assert all(0 < m["rss_gb"] <= m["hwm_gb"] for m in marks)
    assert [m["t"] for m in marks] == sorted(m["t"] for m in marks)


def test_export_reloads_and_reproduces_eval(tmp_path, tiny_model_dir):
    """The exported folder loads with from_pretrained and gives the evaluated protagonist's log-probs."""
    from transformers import AutoModelForCausalLM

    from iopo.core.logprobs import SequenceLogProbs, sequence_logps
    from iopo.core.losses import offline_metrics
    from iopo.engine.scoring import dataset_logps

    cfg = make_cfg(tmp_path, tiny_model_dir, "iopo.n_iter=1", "iopo.n_mu=2", "iopo.n_nu=1")
    results = train(cfg)
    model = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final")
    assert model.__class__.__name__ == "LlamaForCausalLM"
    tokenizer = load_tokenizer(cfg.model)
    _, test_pairs, _ = load_training_data(cfg.data, tokenizer, None)
    from accelerate import Accelerator

    module = SequenceLogProbs(model)
    logps = dataset_logps(
        lambda b: sequence_logps(module, b), test_pairs, 2, tokenizer.pad_token_id, Accelerator(cpu=True)
    )
    ref = torch.load(cfg.run_dir / "eval_reference_logps.pt")
    again = offline_metrics(
        logps["chosen_logps"], logps["rejected_logps"], ref["chosen_logps"], ref["rejected_logps"], 0.5
    )
    assert again["margin_reward"] == pytest.approx(results["margin_reward"], abs=1e-5)
    assert again["margin_reward"] != 0.0


@pytest.mark.parametrize("lora", [False, True])
def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, monkeypatch, lora):
    extra = [
        "iopo.n_iter=2",
        "iopo.n_mu=2",
        "iopo.n_nu=1",
        "optim.gradient_accumulation_steps=2",
        "optim.batch_size=2",
        f"model.lora={str(lora).lower()}",
        "model.lora_r=4",
        "optim.lr_scheduler=cosine",
    ]
    straight = make_cfg(tmp_path / "a", tiny_model_dir, *extra)
    train(straight)

    broken = make_cfg(tmp_path / "b", tiny_model_dir, *extra)
    calls = {"n": 0}
    real_step = fit_module.train_step

    def crash_on_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(fit_module, "train_step", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        train(broken)
    monkeypatch.setattr(fit_module, "train_step", real_step)
    saved = sorted(p.name for p in (broken.run_dir / "checkpoints").iterdir())
    assert saved == ["step-0000003"]  # the interrupt saved the three finished steps
    with pytest.raises(Exception, match="already holds an earlier run .*checkpoints.step-0000003"):
        train(broken)  # a fresh start would lose them: refused
    resumed = train(broken.model_copy(update={"resume": True}))

    a, b = _final_weights(straight.run_dir), _final_weights(broken.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert [r["step"] for r in train_records(broken.run_dir)] == list(range(1, 7))  # no step logged twice
    straight_eval = json.loads((straight.run_dir / "eval.json").read_text())
    assert resumed["margin_reward"] == pytest.approx(straight_eval["margin_reward"], abs=1e-5)


@pytest.mark.parametrize(("method", "lora"), [("iopo", False), ("dpo", True)])
def test_two_fits_on_one_session_equal_one_fit_over_the_whole_schedule(
    tmp_path, tiny_model_dir, method, lora
):
    """The online rounds call fit() again and again on one session: the split must not change what is computed."""
    extra = ["iopo.n_iter=3", "optim.max_steps=6", f"model.lora={str(lora).lower()}", "model.lora_r=4"]
    cfg = make_cfg(tmp_path, tiny_model_dir, *extra, method=method)

    def weights(split: int):
        from accelerate.utils import set_seed

        accelerator = open_accelerator(cfg)
        set_seed(cfg.seed)
        tokenizer = open_tokenizer(cfg, accelerator)
        pairs, _, _ = load_training_data(cfg.data, tokenizer, None)
        schedule = build_schedule(cfg, len(pairs), 4)
        session = open_session(cfg, accelerator, tokenizer, schedule)
        fit(session, pairs, schedule[:split])
        fit(session, pairs, schedule[split:])
        assert session.step == 6 and session.position == 6
        return {k: v.detach().clone() for k, v in session.policy.module.named_parameters() if v.requires_grad}

    whole, split = weights(6), weights(2)
    moved = weights(0)  # the same as whole: a sanity check of the comparison itself
    assert whole.keys() == split.keys() and len(whole) > 0
    for key in whole:
        torch.testing.assert_close(whole[key], split[key], atol=0, rtol=0)
        torch.testing.assert_close(whole[key], moved[key], atol=0, rtol=0)
    start = build_players(cfg, METHODS[method], open_accelerator(cfg), None)[0]
    first = next(iter(start.values())).module
    assert any(
        not torch.equal(p.detach(), whole[n]) for n, p in first.named_parameters() if n in whole
    )  # and training moved the weights


def test_reversed_adversary_and_symmetric_clip_run(tmp_path, tiny_model_dir):
    cfg = make_cfg(
        tmp_path,
        tiny_model_dir,
        "iopo.n_iter=1",
        "iopo.adversary=reversed",
        "iopo.is_clip=symmetric",
        "iopo.is_logp=mean",
    )
    train(cfg)
    records = train_records(cfg.run_dir)
    assert [r["agent"] for r in records] == ["protagonist", "adversary"]
    assert all(0.7 - 1e-6 <= r["is/weight_min"] <= r["is/weight_max"] <= 1.3 + 1e-6 for r in records)


def test_bf16_autocast_run_keeps_float32_logps(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, "iopo.n_iter=1", "mixed_precision=bf16")
    results = train(cfg)
    records = train_records(cfg.run_dir)
    assert all(math.isfinite(r["loss"]) for r in records)
    # Step one: the players are equal, so h = 0 exactly even under bf16 autocast (the same forward twice).
    assert records[0]["loss"] == pytest.approx(records[0]["is/weight_mean"] * math.log(2), rel=1e-5)
    assert math.isfinite(results["margin_reward"])
    saved = load_file(cfg.run_dir / "final" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())  # master weights stay fp32


def test_checkpoint_files_load_weights_only_and_a_pickle_bomb_is_refused(tmp_path, tiny_model_dir):
    """Every state file of a checkpoint loads with weights_only=True; a file that would run code on unpickling is
    refused with one line naming it, and its code never runs."""
    cfg = make_cfg(tmp_path, tiny_model_dir, "iopo.n_iter=1")
    train(cfg)
    checkpoint = next((cfg.run_dir / "checkpoints").iterdir())
    for path in checkpoint.glob("*.pt"):
        torch.load(path, weights_only=True)  # raises on anything but tensors and plain containers

    marker = tmp_path / "pwned"

    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state": Bomb()}, checkpoint / "protagonist.optimizer.pt")
    from iopo.cli import main

    resumed = run_overrides(
        tiny_model_dir, tmp_path / "pairs.jsonl", cfg.run_dir, "iopo.n_iter=2", "resume=true"
    )
    assert main(["train", *resumed]) == 2
    assert not marker.exists()


def test_a_diverging_run_stops_at_the_first_non_finite_step_and_exports_nothing(
    tmp_path, tiny_model_dir, capsys
):
    from iopo.cli import main

    args = run_overrides(
        tiny_model_dir,
        write_pairs(tmp_path / "pairs.jsonl"),
        tmp_path / "run",
        "optim.learning_rate=1e30",
        "optim.max_grad_norm=null",
        "iopo.n_iter=4",
        "save_steps=1",
    )
    assert main(["train", *args]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("iopo: error:")]
    assert (
        len(errors) == 1 and "non-finite" in errors[0] and "at step" in errors[0] and "of the " in errors[0]
    )
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "eval.json").exists()
    from safetensors.torch import load_file

    for checkpoint in (tmp_path / "run" / "checkpoints").glob("step-*"):
        for weights in checkpoint.glob("*/model.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(weights).values()), weights


@pytest.mark.parametrize("bad", ["optim.learning_rate=inf", "optim.learning_rate=nan", "loss.beta=.inf"])
def test_infinite_and_nan_settings_are_refused(bad):
    from iopo.config import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_config(None, [bad])


def test_resume_skips_stray_folders_detects_damage_and_works_from_a_moved_folder(tmp_path, tiny_model_dir):
    import shutil

    from iopo.cli import main

    data = write_pairs(tmp_path / "pairs.jsonl")
    straight = tmp_path / "straight"
    assert main(["train", *run_overrides(tiny_model_dir, data, straight, "iopo.n_iter=2")]) == 0

    run = tmp_path / "run"
    more = run_overrides(tiny_model_dir, data, run, "iopo.n_iter=2", "save_steps=1")
    assert main(["train", *more]) == 0  # the two newest checkpoints are kept, each with checksums.json
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert [p.name for p in checkpoints] == ["step-0000003", "step-0000004"]
    assert all((p / "checksums.json").is_file() for p in checkpoints)

    # A stray empty newer step folder is not a checkpoint.
    (run / "checkpoints" / "step-0000009").mkdir()
    # A flipped byte in the newest checkpoint: one line naming it and the newest intact one.
    damaged = checkpoints[-1] / "protagonist.optimizer.pt"
    blob = bytearray(damaged.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    damaged.write_bytes(bytes(blob))
    with pytest.raises(
        ConfigError, match=r"step-0000004 is damaged \(protagonist.optimizer.pt does not match"
    ):
        train(load_config(None, [*more, "resume=true"]))
    try:
        train(load_config(None, [*more, "resume=true"]))
    except ConfigError as e:
        assert f"resume={checkpoints[0]}" in str(e)

    # A moved run folder resumes (from its intact checkpoint) and ends where the uninterrupted run ends.
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    shutil.rmtree(moved / "checkpoints" / "step-0000004")
    shutil.rmtree(moved / "final")
    resumed = run_overrides(tiny_model_dir, data, moved, "iopo.n_iter=2", "save_steps=1", "resume=true")
    assert main(["train", *resumed]) == 0
    a, b = _final_weights(straight), _final_weights(moved)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_conflicting_schedule_settings_and_a_zero_first_step_are_said(tmp_path, tiny_model_dir, capsys):
    cfg = make_cfg(tmp_path, tiny_model_dir, "iopo.n_iter=1", "optim.max_steps=7", "optim.warmup_ratio=0.5")
    train(cfg)
    said = capsys.readouterr()
    assert "optim.max_steps=7 is not used" in said.out
    assert "[iopo] warning: the protagonist's first step runs at learning rate 0" in said.err
    assert [r["learning_rate"] for r in train_records(cfg.run_dir)] == [0.0, 0.0]  # what was said happened


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_a_deliberate_setting(tmp_path, tiny_model_dir, accelerator, disable):
    """Trained players are in train mode; model.disable_dropout (default, as TRL) zeroes every dropout, else the
    agent's forward uses the model's dropout while the frozen env/reference never does."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.attention_dropout = 0.5
    model.save_pretrained(tmp_path / "dropout")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tiny_model_dir / name).is_file():
            (tmp_path / "dropout" / name).write_bytes((tiny_model_dir / name).read_bytes())
    cfg = make_cfg(
        tmp_path, tmp_path / "dropout", f"model.disable_dropout={str(disable).lower()}", method="dpo"
    )
    players, reference, batch = setup_players(cfg, accelerator)
    policy = players["policy"]
    assert policy.module.training and not reference.module.training
    attention = [m for m in policy.module.modules() if hasattr(m, "attention_dropout")]
    assert attention and all(m.attention_dropout == (0.0 if disable else 0.5) for m in attention)
    with torch.no_grad():
        first = sequence_logps(policy.module, batch)["chosen_logps"]
        second = sequence_logps(policy.module, batch)["chosen_logps"]
    assert torch.equal(first, second) == disable  # dropout active only when asked for
    ref = [player_logps(reference, batch, players, grad=False)["chosen_logps"] for _ in range(2)]
    assert torch.equal(*ref)  # the reference never drops out


@pytest.mark.parametrize("moment", ["inside the checkpoint write", "right after a checkpoint"])
def test_kill_9_in_the_checkpoint_window_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, moment):
    """A real SIGKILL while a checkpoint is being written (its temp folder exists) or just after one is renamed into
    place: resume=true ends with the weights of the uninterrupted run, and no half checkpoint is ever resumed from."""
    import signal

    extra = ["iopo.n_iter=3", "iopo.n_mu=2", "iopo.n_nu=1", "save_steps=1", "save_total_limit=3"]
    straight = make_cfg(tmp_path / "a", tiny_model_dir, *extra)
    train(straight)
    data = tmp_path / "a" / "pairs.jsonl"
    run = tmp_path / "b" / "run"
    args = run_overrides(tiny_model_dir, data, run, "method=iopo", *extra)
    root = run / "checkpoints"

    def ready() -> bool:
        names = [p.name for p in root.iterdir()] if root.is_dir() else []
        if moment == "inside the checkpoint write":
            return any(n.startswith(".tmp-step-0000004") for n in names)
        return "step-0000004" in names

    code = kill_9_when(["train", *args], ready)
    assert code == -signal.SIGKILL, "the run ended before the kill: the window was missed"
    resumed = train(load_config(None, [*args, "resume=true"]))
    a, b = _final_weights(straight.run_dir), _final_weights(run)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    straight_eval = json.loads((straight.run_dir / "eval.json").read_text())
    assert resumed["margin_reward"] == pytest.approx(straight_eval["margin_reward"], abs=1e-6)
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # the torn write was cleaned up


def test_reference_cache_is_shared_across_seeds_and_methods_and_equals_computing(
    tmp_path, tiny_model_dir, capsys
):
    """eval_reference_cache: the second run (another seed, another method) reads the first run's test-split
    reference log-probs, and its evaluation equals that of a run computing them itself; another starting model, or
    a damaged cache file, is computed afresh."""
    cache = tmp_path / "refcache"
    shared = ("model.lora=true", "optim.max_steps=2", "eval_steps=null", f"eval_reference_cache={cache}")
    first = train(make_cfg(tmp_path / "a", tiny_model_dir, *shared, "seed=1", method="dpo"))
    (key_file,) = cache.glob("*.pt")
    assert "reused" not in capsys.readouterr().out
    second_cfg = make_cfg(tmp_path / "b", tiny_model_dir, *shared, "seed=2", method="iopo")
    second = train(second_cfg)
    assert f"reused {key_file}" in capsys.readouterr().out and list(cache.glob("*.pt")) == [key_file]
    # the same run computing its own reference gives the same evaluation, to the last bit
    alone = train(make_cfg(tmp_path / "c", tiny_model_dir, *shared[:-1], "seed=2", method="iopo"))
    assert second["margins"] == alone["margins"] and second["pairwise_accuracy"] == alone["pairwise_accuracy"]
    assert first["n_pairs"] == second["n_pairs"]
    # a damaged file is not trusted: computed again (and rewritten)
    key_file.write_bytes(b"not a tensor file")
    train(make_cfg(tmp_path / "d", tiny_model_dir, *shared, "seed=3", method="dpo"))
    assert "reused" not in capsys.readouterr().out
    assert torch.load(key_file, weights_only=True)["chosen_logps"].numel() == first["n_pairs"]
    # full fine-tuning starts from the same weights but under other parameter names: its own entry
    train(make_cfg(tmp_path / "e", tiny_model_dir, *shared[1:], "seed=1", method="dpo"))
    assert "reused" not in capsys.readouterr().out and len(list(cache.glob("*.pt"))) == 2


def test_an_adapter_switch_is_undone_when_the_player_is_done(tmp_path, tiny_model_dir, accelerator):
    """acting(player) selects the player's LoRA adapter (or none, for the reference) and restores the one that was
    active before, also when the forward fails; every player's adapter stays trainable throughout (DDP's view)."""
    from iopo.core.logprobs import language_model
    from iopo.engine.players import acting

    cfg = make_cfg(tmp_path, tiny_model_dir, "model.lora=true", "model.lora_r=4")
    players, _, _ = build_players(cfg, METHODS["iopo"], accelerator, None)
    model = language_model(players["protagonist"].module)
    assert model.active_adapter == "protagonist"
    with acting(players["adversary"], players):
        assert model.active_adapter == "adversary"
        assert all(p.requires_grad for pl in players.values() for p in pl.params)
    assert model.active_adapter == "protagonist"
    with pytest.raises(RuntimeError, match="forward failed"), acting(players["adversary"], players):
        raise RuntimeError("forward failed")
    assert model.active_adapter == "protagonist"
    assert all(p.requires_grad for pl in players.values() for p in pl.params)
