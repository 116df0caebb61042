"""The relatives' losses and targets as their reference code computes them, re-implemented line for line so that
tests/test_relatives.py can hold iopo's functions against them (the originals cannot be imported here: research
scripts with their own trainers, OAT needs Launchpad/vLLM/DeepSpeed). Each function quotes its source.

Sources (read from repository snapshots):
- SPPO: uclaml/SPPO 5e61c4e90822fe526d8bbe1a50a6e85a85c30911, sppo/trainer.py `SPPOTrainer.sppo_loss` (lines
  824-919) and scripts/compute_prob.py (`from_ranks`, `prepare_score`).
- TRL's sppo_hard: trl 1.16.0, trl/trainer/dpo_trainer.py `DPOTrainer._compute_loss` (lines 1438-1446); the test
  also calls that method itself when trl is installed.
- INPO: no code of the authors is public; ntlfi/ENPO 7d1c5656 workers/train_inpo.py `INPOTrainer.compute_loss`
  (a reproduction of the paper's Alg. 1).
- SPIN: uclaml/SPIN a12ba808a51c23bb98c7cc892d261e9c2f71ff8e, spin/alignment/trainer.py `spin_loss` (416-466).
- XPO: sail-sg/oat 9856c56ea7e4bf0341ddc8b2c583d24a1890f2cf, oat/baselines/xpo.py `XPOLearner.learning_step` and
  oat/learners/loss.py `DPOLoss`; TRL v0.20.0 trl/trainer/xpo_trainer.py `_compute_losses` (lines 323-361).
All take summed completion log-probs, as every one of these codes does (average_log_prob=False).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def sppo_uclaml(pi_c, pi_r, ref_c, ref_r, beta, chosen_probs_win, chosen_probs_lose):
    """uclaml/SPPO loss_type="sppo":
    logits_w = policy_chosen_logps - reference_chosen_logps
    logits_l = policy_rejected_logps - reference_rejected_logps
    loss_w = (logits_w - (1 / self.beta)*(chosen_probs_win - 0.5)) ** 2
    loss_l = (logits_l - (1 / self.beta)*(chosen_probs_lose - 0.5)) ** 2
    losses = (loss_w + loss_l)/2"""
    logits_w = pi_c - ref_c
    logits_l = pi_r - ref_r
    loss_w = (logits_w - (1 / beta) * (chosen_probs_win - 0.5)) ** 2
    loss_l = (logits_l - (1 / beta) * (chosen_probs_lose - 0.5)) ** 2
    return (loss_w + loss_l) / 2


def sppo_uclaml_targets(scores):
    """uclaml/SPPO scripts/compute_prob.py for one prompt's K answers scored by PairRM:
    prb[i][j] = 1 / (1 + np.exp(score[j] - score[i]))        # P(i beats j), the diagonal 1/2
    metrics_prob = ... np.stack(x).sum(axis=1) / K           # win rate, the self term included
    maxmin = [x.argmax(), x.argmin()]                        # chosen, rejected by score
    chosen_probs_win = win[c]; chosen_probs_lose = win[r]
    Returns (chosen index, rejected index, chosen_probs_win, chosen_probs_lose)."""
    scores = np.asarray(scores, dtype=float)
    k = len(scores)
    prb = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            prb[i][j] = 1 / (1 + np.exp(scores[j] - scores[i]))
    win = prb.sum(axis=1) / k
    c, r = int(scores.argmax()), int(scores.argmin())
    return c, r, win[c], win[r]


def sppo_hard_trl(pi_c, pi_r, ref_c, ref_r, beta):
    """TRL 1.16 loss_type="sppo_hard":
    winner_margin_error = (chosen_logratios - 0.5 / self.beta) ** 2
    loser_margin_error = (rejected_logratios + 0.5 / self.beta) ** 2
    per_sequence_loss = winner_margin_error + loser_margin_error"""
    return (pi_c - ref_c - 0.5 / beta) ** 2 + (pi_r - ref_r + 0.5 / beta) ** 2


def inpo_enpo(pi_c, pi_r, ref_c, ref_r, t_c, t_r, eta, tau):
    """ntlfi/ENPO INPOTrainer.compute_loss:
    h = delta_pi - self._w_ref * delta_ref - self._w_t * delta_t     # _w_ref = tau/eta, _w_t = (eta-tau)/eta
    loss = (h - self._target).pow(2).mean()                          # _target = 1/(2 eta)"""
    delta_pi, delta_ref, delta_t = pi_c - pi_r, ref_c - ref_r, t_c - t_r
    h = delta_pi - (tau / eta) * delta_ref - ((eta - tau) / eta) * delta_t
    return (h - 1.0 / (2.0 * eta)) ** 2


def spin_uclaml(pi_real, pi_gen, opp_real, opp_gen, beta, loss_type="sigmoid"):
    """uclaml/SPIN spin_loss:
    pi_logratios = policy_real_logps - policy_generated_logps
    ref_logratios = opponent_real_logps - opponent_generated_logps
    logits = pi_logratios - ref_logratios
    sigmoid: losses = -F.logsigmoid(self.beta * logits); hinge: losses = torch.relu(1 - self.beta * logits)"""
    logits = (pi_real - pi_gen) - (opp_real - opp_gen)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits)
    return torch.relu(1 - beta * logits)


def xpo_oat(pi_c, pi_r, ref_c, ref_r, chosen_id, same, beta, alpha):
    """OAT XPOLearner.learning_step (the batch's scalar loss):
    preference_loss = (DPOLoss losses * loss_masks).mean()          # loss_masks = 1 - same_masks
    ref_logps = torch.where(chosen == 0, rejected_logps, chosen_logps)   # chosen: 1 = the chosen is the ref's
    optimism_loss = (ref_logps * loss_masks).mean()
    loss = preference_loss + self.xpo_alpha * optimism_loss"""
    loss_masks = 1 - same.to(pi_c.dtype)
    logits = (pi_c - pi_r) - (ref_c - ref_r)
    preference_loss = (-F.logsigmoid(beta * logits) * loss_masks).mean()
    ref_logps = torch.where(chosen_id == 0, pi_r, pi_c)
    optimism_loss = (ref_logps * loss_masks).mean()
    return preference_loss + alpha * optimism_loss


def xpo_trl(model_lp_model, model_lp_ref, ref_lp_ref, ref_lp_model, chosen_mask, beta, alpha):
    """TRL XPOTrainer._compute_losses (v0.12-v0.27): chosen_mask = the policy's answer won;
    logits = chosen_log_ratios - rejected_log_ratios; dpo_losses = -F.logsigmoid(self.beta * logits)
    xpo_losses = self.alpha * model_logprobs_ref_data_sum; loss = (dpo_losses + xpo_losses).mean()"""
    ch_m = torch.where(chosen_mask, model_lp_model, model_lp_ref)
    ch_r = torch.where(chosen_mask, ref_lp_model, ref_lp_ref)
    rj_m = torch.where(~chosen_mask, model_lp_model, model_lp_ref)
    rj_r = torch.where(~chosen_mask, ref_lp_model, ref_lp_ref)
    logits = (ch_m - ch_r) - (rj_m - rj_r)
    return (-F.logsigmoid(beta * logits) + alpha * model_lp_ref).mean()
