"""SPPO, INPO, SPIN and XPO: hand-derived loss values, agreement with their reference code (tests/
reference_relatives.py, and TRL's own sppo_hard), the pairs their online rounds make, and who moves in a step.

Hand values use pol_w = -3, pol_l = -4, ref_w = ref_l = -3.5 (so log-ratios h_w = 0.5, h_l = -0.5, Delta = 1).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import reference_relatives as ref
import torch

from iopo.config import TrainConfig
from iopo.core.losses import inpo_loss, spin_loss, sppo_loss, xpo_loss
from iopo.core.methods import METHODS, ONLINE_METHODS
from iopo.online.pairs import exploration_pairs, self_play_pairs, sppo_pairs, win_probabilities

POL = (torch.tensor([-3.0]), torch.tensor([-4.0]))
REF = (torch.tensor([-3.5]), torch.tensor([-3.5]))
LENS = (torch.tensor([3]), torch.tensor([4]))


def one(losses) -> float:
    return float(losses[0][0])


# ---------------------------------------------------------------- hand-derived values


def test_sppo_hard_and_soft_by_hand():
    """beta = 0.5, so 1/beta = 2. Hard (P_w = 1, P_l = 0): (0.5 - 1)^2 + (-0.5 + 1)^2 = 0.5.
    Soft P_w = 0.8, P_l = 0.3: targets 0.3 * 2 = 0.6 and -0.2 * 2 = -0.4: (0.5 - 0.6)^2 + (-0.5 + 0.4)^2 = 0.02."""
    assert one(sppo_loss(*POL, *REF, *LENS, beta=0.5)) == pytest.approx(0.5, rel=1e-6)
    soft = sppo_loss(
        *POL, *REF, *LENS, beta=0.5, chosen_win=torch.tensor([0.8]), rejected_win=torch.tensor([0.3])
    )
    assert one(soft) == pytest.approx(0.02, rel=1e-5)
    assert float(soft[1]["sppo/win_chosen"]) == pytest.approx(0.8)


def test_inpo_by_hand_and_offline_equals_ipo():
    """eta = 0.25: h = Delta_pi - Delta_env = 1 - 0 = 1, target 1/(2 eta) = 2: (1 - 2)^2 = 1. With the env a blend
    (tau/eta = 0.4 of ref, 0.6 of pi_t where pi_t(w) = -3.2, pi_t(l) = -3.7, Delta_t = 0.5): env Delta = 0.3, h = 0.7,
    loss (0.7 - 2)^2 = 1.69 (ENPO's form gives the same)."""
    assert one(inpo_loss(*POL, *REF, *LENS, eta=0.25, beta=0.1)) == pytest.approx(1.0, rel=1e-6)
    blend = (0.4 * -3.5 + 0.6 * -3.2, 0.4 * -3.5 + 0.6 * -3.7)
    got = one(inpo_loss(*POL, torch.tensor([blend[0]]), torch.tensor([blend[1]]), *LENS, eta=0.25, beta=0.1))
    assert got == pytest.approx(1.69, rel=1e-5)
    enpo = ref.inpo_enpo(-3.0, -4.0, -3.5, -3.5, -3.2, -3.7, eta=0.25, tau=0.1)
    assert got == pytest.approx(enpo, rel=1e-5)


def test_spin_forms_by_hand():
    """beta = 0.5, dpo_logits = 1: logistic ln(1 + e^-0.5) = 0.474077; hinge 1 - 0.5 = 0.5; ipo (1 - 1)^2 = 0."""
    assert one(spin_loss(*POL, *REF, *LENS, beta=0.5)) == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-6)
    assert one(spin_loss(*POL, *REF, *LENS, beta=0.5, form="hinge")) == pytest.approx(0.5, rel=1e-6)
    assert one(spin_loss(*POL, *REF, *LENS, beta=0.5, form="ipo")) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="unknown SPIN loss"):
        spin_loss(*POL, *REF, *LENS, beta=0.5, form="square")


def test_xpo_by_hand():
    """beta = 0.5, alpha = 0.1: DPO ln(1 + e^-0.5) = 0.474077, plus 0.1 * logp_pi of the reference's answer:
    chosen (-3) -> 0.174077, rejected (-4) -> 0.074077, none (side 1/2) -> 0.474077; offline (no side) = DPO."""
    dpo = math.log1p(math.exp(-0.5))
    for side, want in ((1.0, dpo - 0.3), (0.0, dpo - 0.4), (0.5, dpo)):
        got = one(xpo_loss(*POL, *REF, *LENS, beta=0.5, alpha=0.1, reference_side=torch.tensor([side])))
        assert got == pytest.approx(want, rel=1e-6)
    assert one(xpo_loss(*POL, *REF, *LENS, beta=0.5, alpha=0.1)) == pytest.approx(dpo, rel=1e-6)


# ---------------------------------------------------------------- against the reference code


def random_logps(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = -20 * torch.rand(4, n, generator=g, dtype=torch.float64)
    pi_c, pi_r = base[0] + 0.3 * torch.randn(n, generator=g, dtype=torch.float64), base[1]
    return pi_c, pi_r, base[2], base[3], torch.full((n,), 5), torch.full((n,), 6)


def test_sppo_equals_the_authors_soft_loss_times_two():
    """uclaml/SPPO's "sppo" averages the two answers' squares; iopo sums them, as TRL's sppo_hard does (the issue:
    hard = TRL's), so ours is exactly 2x theirs on the same inputs (the same minimiser; a factor on the step)."""
    pi_c, pi_r, rc, rr, lc, lr = random_logps()
    g = torch.Generator().manual_seed(1)
    win, lose = (
        torch.rand(16, generator=g, dtype=torch.float64),
        torch.rand(16, generator=g, dtype=torch.float64),
    )
    ours, _ = sppo_loss(pi_c, pi_r, rc, rr, lc, lr, beta=0.05, chosen_win=win, rejected_win=lose)
    theirs = ref.sppo_uclaml(pi_c, pi_r, rc, rr, 0.05, win, lose)
    torch.testing.assert_close(ours.double(), 2 * theirs, rtol=1e-5, atol=1e-5)


def test_sppo_hard_equals_trls_own_dpo_trainer():
    """TRL 1.16's DPOTrainer._compute_loss with loss_type="sppo_hard", called on given log-probs (its state set
    by hand; a stand-in model whose per-token log-probs sum to the given ones), against iopo's sppo_loss."""
    trl = pytest.importorskip("trl.trainer.dpo_trainer", reason="trl (the dev extra) is not installed")
    pi_c, pi_r, rc, rr, lc, lr = random_logps(8)
    b, width = 8, 4

    class Model:
        training = True

        def __call__(self, **kw):
            lp = torch.zeros(2 * b, width - 1, dtype=torch.float64)
            lp[:, -1] = torch.cat([pi_c, pi_r])  # all of a sequence's log-prob on its one completion token
            return SimpleNamespace(
                log_probs=lp,
                entropy=torch.zeros_like(lp),
                mean_logits=torch.zeros_like(lp),
                is_top1=torch.zeros_like(lp, dtype=torch.bool),
                aux_loss=None,
            )

    trainer = trl.DPOTrainer.__new__(trl.DPOTrainer)  # _compute_loss reads only these attributes
    trainer.model = SimpleNamespace(training=True)
    trainer.accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer.aux_loss_enabled, trainer.ld_alpha, trainer.precompute_ref_logps = False, None, True
    trainer.f_divergence_type, trainer.loss_types, trainer.loss_weights = "reverse_kl", ["sppo_hard"], [1.0]
    trainer.beta, trainer.label_smoothing, trainer.use_weighting = 0.1, 0.0, False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    completion = torch.zeros(2 * b, width, dtype=torch.long)
    completion[:, -1] = 1
    inputs = {
        "input_ids": torch.ones(2 * b, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, width, dtype=torch.long),
        "completion_mask": completion,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    theirs = trainer._compute_loss(Model(), inputs, return_outputs=False)
    ours, _ = sppo_loss(pi_c, pi_r, rc, rr, lc, lr, beta=0.1)
    assert float(ours.double().mean()) == pytest.approx(float(theirs), rel=1e-6)
    torch.testing.assert_close(
        ours.double(), ref.sppo_hard_trl(pi_c, pi_r, rc, rr, 0.1), rtol=1e-6, atol=1e-4
    )


def test_inpo_with_the_blended_env_equals_enpos_two_references():
    pi_c, pi_r, rc, rr, lc, lr = random_logps()
    g = torch.Generator().manual_seed(2)
    tc, tr = (
        rc + torch.randn(16, generator=g, dtype=torch.float64),
        rr + torch.randn(16, generator=g, dtype=torch.float64),
    )
    eta, tau = 0.075, 0.025
    w = METHODS["inpo"].mix(TrainConfig(method="inpo", inpo={"eta": eta, "tau": tau}))
    assert w == pytest.approx(1 / 3)
    ours, _ = inpo_loss(pi_c, pi_r, w * rc + (1 - w) * tc, w * rr + (1 - w) * tr, lc, lr, eta=eta, beta=0.1)
    torch.testing.assert_close(
        ours.double(), ref.inpo_enpo(pi_c, pi_r, rc, rr, tc, tr, eta, tau), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize(("form", "theirs"), [("logistic", "sigmoid"), ("hinge", "hinge")])
def test_spin_equals_the_authors_loss(form, theirs):
    pi_c, pi_r, rc, rr, lc, lr = random_logps()
    ours, _ = spin_loss(pi_c, pi_r, rc, rr, lc, lr, beta=0.1, form=form)
    torch.testing.assert_close(
        ours.double(), ref.spin_uclaml(pi_c, pi_r, rc, rr, 0.1, theirs), rtol=1e-5, atol=1e-6
    )


def test_xpo_equals_oat_and_trl_on_the_same_pairs():
    """OAT's and TRL's batch loss is the mean over pairs of DPO + alpha * logp_pi(y_ref): iopo's per-pair losses'
    mean (every pair holds one reference answer; none is a pair of equal answers, which iopo never makes)."""
    pi_c, pi_r, rc, rr, lc, lr = random_logps()
    side = (torch.arange(16) % 3 == 0).double()  # 1: the reference's answer is the chosen one
    ours, _ = xpo_loss(pi_c, pi_r, rc, rr, lc, lr, beta=0.1, alpha=0.05, reference_side=side)
    oat = ref.xpo_oat(pi_c, pi_r, rc, rr, side.long(), torch.zeros(16, dtype=torch.bool), 0.1, 0.05)
    assert float(ours.double().mean()) == pytest.approx(float(oat), rel=1e-6)
    # TRL names the answers by origin: y_model (the policy's) and y_ref; chosen_mask = the policy's answer won
    policy_won = side == 0
    model_lp_model = torch.where(policy_won, pi_c, pi_r)
    model_lp_ref = torch.where(policy_won, pi_r, pi_c)
    ref_lp_model = torch.where(policy_won, rc, rr)
    ref_lp_ref = torch.where(policy_won, rr, rc)
    trl = ref.xpo_trl(model_lp_model, model_lp_ref, ref_lp_ref, ref_lp_model, policy_won, 0.1, 0.05)
    assert float(ours.double().mean()) == pytest.approx(float(trl), rel=1e-6)


# ---------------------------------------------------------------- the pairs of the online rounds


def answers_of(texts_per_prompt):
    out = []
    for p, texts in enumerate(texts_per_prompt):
        out += [{"prompt": f"q{p}", "prompt_id": f"id{p}", "answer": t} for t in texts]
    return out


def test_sppo_targets_equal_the_authors_compute_prob():
    """Five answers scored by a reward model: the chosen (best) and rejected (worst) answers and their P-hat are
    compute_prob.py's (Bradley-Terry on the scores, the self term 1/2 included in the mean over K)."""
    scores = [0.3, -1.2, 2.0, 0.7, -0.1]
    judged = [
        {"prompt": 0, "answer": i, "other": None, "kind": "score", "result": {"valid": True, "score": s}}
        for i, s in enumerate(scores)
    ]
    answers = answers_of([["a", "b", "c", "d", "e"]])
    rows, facts = sppo_pairs(answers, judged, 5)
    c, r, win_c, win_r = ref.sppo_uclaml_targets(scores)
    assert facts == {"prompts": 1, "kept": 1, "unusable_prompts": 0}
    assert rows[0]["chosen"] == "abcde"[c] and rows[0]["rejected"] == "abcde"[r]
    assert rows[0]["extras"]["chosen_win"] == pytest.approx(win_c, rel=1e-12)
    assert rows[0]["extras"]["rejected_win"] == pytest.approx(win_r, rel=1e-12)


def test_win_probabilities_from_verdicts_in_both_orders():
    """Three answers, pairwise: 0 beats 1 in both orders (P = 1), 0 vs 2 split (P = 1/2), 1 vs 2 a tie then a
    loss (P(1 > 2) = (1/2 + 0)/2 = 1/4). P-hat_0 = (1 + 1/2 + 1/2)/3, P-hat_1 = (0 + 1/4 + 1/2)/3,
    P-hat_2 = (1/2 + 3/4 + 1/2)/3. A pair with an invalid order counts for neither answer."""

    def verdict(i, j, winner):
        return {
            "prompt": 0,
            "answer": i,
            "other": j,
            "kind": "pairwise",
            "result": {"valid": True, "winner": winner},
        }

    rows = [verdict(0, 1, "A"), verdict(1, 0, "B"), verdict(0, 2, "A"), verdict(2, 0, "A")]
    rows += [verdict(1, 2, "tie"), verdict(2, 1, "A")]
    assert win_probabilities(rows, 3) == pytest.approx([2 / 3, 0.75 / 3, 1.75 / 3])
    rows[-1]["result"] = {"valid": False}
    assert win_probabilities(rows, 3) == pytest.approx([2 / 3, 0.5 / 2, 1.0 / 2])


def test_sppo_makes_no_pair_of_equal_answers():
    judged = [
        {"prompt": 0, "answer": i, "other": None, "kind": "score", "result": {"valid": True, "score": i}}
        for i in range(2)
    ]
    rows, facts = sppo_pairs(answers_of([["same", "same"]]), judged, 2)
    assert rows == [] and facts["unusable_prompts"] == 1


def test_spin_pairs_the_data_answer_against_each_own_answer():
    answers = answers_of([["x", "gold0"], ["y", "z"]])
    rows, facts = self_play_pairs(answers, {"id0": "gold0", "id1": "gold1"})
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("gold0", "x"), ("gold1", "y"), ("gold1", "z")]
    assert facts == {"answers": 4, "kept": 3, "same_as_data": 1}


def test_xpo_pairs_mark_the_side_of_the_reference_answer():
    """Per prompt [policy answer, reference answer] scored: prompt 0 the reference wins (side 1), prompt 1 the
    policy wins (side 0), prompt 2 a tie within the margin (no pair)."""
    scores = [0.0, 1.0, 2.0, 1.0, 0.5, 0.55]
    judged = [
        {
            "prompt": i // 2,
            "answer": i % 2,
            "other": None,
            "kind": "score",
            "result": {"valid": True, "score": s},
        }
        for i, s in enumerate(scores)
    ]
    rows, facts = exploration_pairs(answers_of([["p0", "r0"], ["p1", "r1"], ["p2", "r2"]]), judged, 2, 0.1)
    by_prompt = {r["prompt_id"]: (r["chosen"], r["rejected"], r["extras"]["reference_side"]) for r in rows}
    assert by_prompt == {"id0": ("r0", "p0", 1.0), "id1": ("p1", "r1", 0.0)}
    assert facts["kept"] == 2 and facts["reference_chosen"] == 1


# ---------------------------------------------------------------- the table rows


def test_the_rows_say_env_pair_values_and_where_they_run():
    assert METHODS["sppo"].env == "previous" and METHODS["sppo"].pair_values == ("chosen_win", "rejected_win")
    assert METHODS["inpo"].env == "mixed" and METHODS["spin"].env == "previous"
    assert METHODS["xpo"].env == "reference" and METHODS["xpo"].pair_values == ("reference_side",)
    assert METHODS["sppo"].offline and METHODS["inpo"].offline
    assert not METHODS["spin"].offline and not METHODS["xpo"].offline
    assert ONLINE_METHODS["xpo"].reference_answer and ONLINE_METHODS["spin"].own_pairs
    assert not ONLINE_METHODS["spin"].judged and ONLINE_METHODS["sppo"].judged
    with pytest.raises(ValueError, match="must not exceed inpo.eta"):
        TrainConfig(method="inpo", inpo={"eta": 0.1, "tau": 0.2})


# ---------------------------------------------------------------- who moves: the previous policy and the blend


@pytest.mark.parametrize("lora", [False, True])
def test_the_previous_policy_is_a_frozen_copy_and_the_blend_its_mix(
    tmp_path, tiny_model_dir, accelerator, lora
):
    """Online INPO: a step moves the policy only (the starting model and the previous policy keep their
    log-probs); copy_weights makes the previous policy the policy again (LoRA: adapter to adapter); the env's
    log-probs are tau/eta x the start's + (eta - tau)/eta x the previous policy's. Offline, the env is the start."""
    from iopo.data.collate import collate_pairs
    from iopo.data.loading import load_training_data
    from iopo.engine.fit import train_step
    from iopo.engine.players import Blend, copy_weights, env_logps, player_logps
    from iopo.engine.session import open_session
    from iopo.io.models import load_tokenizer

    from tiny import make_cfg

    cfg = make_cfg(
        tmp_path, tiny_model_dir, f"model.lora={str(lora).lower()}", "model.lora_r=4", method="inpo"
    )
    tokenizer = load_tokenizer(cfg.model)
    pairs, _, _ = load_training_data(cfg.data, tokenizer, None)
    batch = collate_pairs(pairs[:4], tokenizer.pad_token_id)
    session = open_session(cfg, accelerator, tokenizer, [("policy", 0)] * 3, rounds=True)
    policy, start, previous = session.policy, session.reference, session.previous
    assert start is not None and previous is not None

    def logps(player):
        return player_logps(player, batch, session.players, grad=False)["chosen_logps"]

    def step():
        env = session.env_of("policy")
        train_step(policy, env, session.players, [batch], session.loss_fns["policy"], accelerator, 1.0)

    at_start = logps(start)
    step()  # the policy moves away from the start
    copy_weights(policy, previous)
    torch.testing.assert_close(logps(previous), logps(policy))
    pi_t = logps(previous)
    step()
    torch.testing.assert_close(logps(previous), pi_t)  # frozen through the step
    torch.testing.assert_close(logps(start), at_start)
    assert not torch.allclose(logps(policy), pi_t)
    env = session.env_of("policy")
    assert isinstance(env, Blend) and [w for w, _ in env.parts] == pytest.approx([1 / 3, 2 / 3])
    blended = env_logps(env, batch, session.players)["chosen_logps"]
    torch.testing.assert_close(blended, at_start / 3 + 2 * pi_t / 3)
    offline = open_session(cfg, accelerator, tokenizer, [("policy", 0)])
    assert offline.previous is None and offline.env_of("policy") is offline.reference


# ---------------------------------------------------------------- the online rounds, end to end


from test_online import Killed, _cli_args, kill_at  # noqa: E402


def online_run(work, out, method, *extra):
    from iopo.commands.online import online
    from iopo.config import OnlineConfig, load_config

    cfg = load_config(None, [f"method={method}", *_cli_args(work, out, *extra)], OnlineConfig)
    return online(cfg), cfg


def read_rows(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method", ["sppo", "inpo", "spin", "xpo"])
def test_each_relative_runs_online_and_leaves_its_pairs(work, tmp_path, method):
    import json

    from safetensors.torch import load_file

    summary, cfg = online_run(work, tmp_path / "run", method)
    assert summary["status"] == "done"
    manifest = json.loads((tmp_path / "run" / "round_2" / "manifest.json").read_text())
    assert tuple(manifest["stages"]) == ONLINE_METHODS[method].stages
    assert (
        manifest["reference"]
        == {
            "sppo": "previous_round",
            "inpo": "0.333333 x initial + 0.666667 x previous_round",
            "spin": "previous_round",
            "xpo": "initial",
        }[method]
    )
    pairs = read_rows(tmp_path / "run" / "round_1" / "pairs.jsonl")
    assert pairs, "a round without pairs trains nothing"
    assert summary["rounds"][0]["pairs"]["kept"] == len(pairs)  # online.json reads the relative's pair stage
    if method == "sppo":  # P-hat of the chosen answer is the larger one, each within (0, 1)
        assert all(0 < p["extras"]["rejected_win"] <= p["extras"]["chosen_win"] < 1 for p in pairs)
    if method == "spin":  # chosen = the data's answer to the prompt
        data = {r["prompt"]: r["chosen"] for r in read_rows(work["data"])}
        assert all(p["chosen"] == data[p["prompt"]] for p in pairs)
    if method == "xpo":  # one policy answer and one reference answer per prompt; the side recorded
        assert len(read_rows(tmp_path / "run" / "round_1" / "reference_generations.jsonl")) == 6
        assert cfg.generation.n == 1
        assert {p["extras"]["reference_side"] for p in pairs} <= {0.0, 1.0}
    card = (tmp_path / "run" / "final" / "README.md").read_text()  # the export's model card names the method
    assert f"- {method}\n" in card and "held-out pairs, against the starting model" in card
    start = load_file(work["base"] / "model.safetensors")
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert any(not torch.equal(start[k], final[k]) for k in start)


@pytest.mark.parametrize(("method", "lora"), [("inpo", False), ("sppo", True), ("spin", False)])
def test_a_kill_inside_round_two_training_resumes_to_the_same_weights(
    work, tmp_path, monkeypatch, method, lora
):
    """Killed in round 2's second optimizer step (after round 1's checkpoint), the same command ends with the
    uninterrupted run's weights: the previous policy is copied again from the resumed policy."""
    from safetensors.torch import load_file

    from iopo.engine import fit as fit_module

    extra = ("rounds=2", "steps_per_round=2", f"model.lora={str(lora).lower()}", "model.lora_r=4")
    online_run(work, tmp_path / "straight", method, *extra)
    kill_at(monkeypatch, fit_module, "train_step", nth=4)
    with pytest.raises(Killed):
        online_run(work, tmp_path / "killed", method, *extra)
    monkeypatch.undo()
    assert online_run(work, tmp_path / "killed", method, *extra)[0]["status"] == "done"
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_online_only_methods_are_refused_by_train_and_xpo_takes_one_answer(work, tmp_path, capsys):
    from iopo.cli import main as iopo_main
    from iopo.config import ConfigError, OnlineConfig, load_config

    args = [
        "train",
        "method=spin",
        f"model={work['base']}",
        f"data={work['data']}",
        f"output_dir={tmp_path / 't'}",
    ]
    assert iopo_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "iopo online method=spin" in err[0]
    assert not (tmp_path / "t").exists()
    with pytest.raises(ConfigError, match="generation.n must be 1"):
        load_config(None, ["method=xpo", *_cli_args(work, tmp_path / "x", "generation.n=2")], OnlineConfig)
