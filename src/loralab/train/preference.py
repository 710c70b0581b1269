"""Preference objectives: DPO (and its sigmoid / hinge / IPO / robust losses) and ORPO, on the loop's LoRA.

A micro batch holds the chosen rows of its pairs, then the rejected rows (data/preference.py). Each
row's score is the sum of its answer tokens' log-probabilities (its labelled positions, as SFT's loss
masks them). DPO's reference is the same model with LoRA switched off (peft.lora.lora_disabled): one
more forward under no_grad, no second copy of the weights and no activations kept for it.

    DPO     Δ = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))
            sigmoid: −(1−ε) log σ(βΔ) − ε log σ(−βΔ)      hinge: max(0, 1 − βΔ)
            robust: (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε)
            ipo: (Δc/|c| − Δr/|r| − 1/(2β))²  (per-token log-ratios, as TRL takes them)
    ORPO    NLL of the chosen answers per token − λ · mean log σ(log odds(c) − log odds(r)), with
            odds(y) = p/(1−p) of the per-token mean log-probability p (Hong et al. 2024; TRL's form)

Accumulation and ranks: a step's loss is the mean over every pair of the global batch (ORPO's NLL: per
chosen answer token of it). The step sums those counts over its micro batches and ranks first
(`counts`) and hands them to every micro batch (NORMS), so each micro batch's loss is its share of
the global mean and the accumulated gradient equals one big batch's (train/step.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.preference import PAIRS
from ..data.prompts import IGNORE_INDEX
from ..model.attention import attention_for_rows
from ..model.head import SELECTED_HEAD, body_and_head, head_matches
from ..peft.lora import lora_disabled
from .loss import CHUNK_ROWS, LossModule

NORMS = "preference_norms"  # batch key: (pairs, chosen answer tokens) of the global batch, over the ranks' count
STATS = ("reward_accuracy", "reward_margin", "policy_accuracy")  # summed per pair into the step's record


def _token_logps(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), labels, reduction="none")  # fp32 softmax, as the SFT loss


def sequence_logps(model, batch: dict, chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(per row: the sum of its labelled tokens' log-probabilities (fp32), per row: how many there are).
    The output layer runs on labelled positions only, in chunks recomputed in backward (loss.py's way)."""
    ids = batch["input_ids"]
    attention_for_rows(model, ids.shape[1])
    inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"], "use_cache": False}
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    parts = body_and_head(model)
    if parts is not None and not hasattr(model, SELECTED_HEAD):  # not converted (model/convert.py): check once
        setattr(model, SELECTED_HEAD, head_matches(model, ids))
    if parts is not None and getattr(model, SELECTED_HEAD):
        body, head = parts
        hidden = body(**inputs).last_hidden_state[:, :-1][keep]
        y = labels[keep]
        if hidden.shape[0] <= chunk_rows or not torch.is_grad_enabled():
            token = torch.cat([_token_logps(head, hidden[i:i + chunk_rows], y[i:i + chunk_rows])
                               for i in range(0, hidden.shape[0], chunk_rows)])
        else:
            token = torch.cat([checkpoint(_token_logps, head, hidden[i:i + chunk_rows], y[i:i + chunk_rows],
                                          use_reentrant=False) for i in range(0, hidden.shape[0], chunk_rows)])
    else:  # a head that does more than a linear map (soft-capping): the model's own logits
        logits = model(**inputs).logits[:, :-1]
        token = -F.cross_entropy(logits[keep].float(), labels[keep], reduction="none")
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(keep)[keep]
    sums = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device).index_add(0, rows, token)
    return sums, keep.sum(1)


def dpo_losses(policy_c, policy_r, ref_c, ref_r, *, beta: float, loss: str = "sigmoid",
               label_smoothing: float = 0.0, n_c=None, n_r=None) -> torch.Tensor:
    """DPO's loss per pair from the summed log-probabilities (n_c, n_r: answer token counts, for ipo)."""
    if loss == "ipo":
        delta = (policy_c - ref_c) / n_c.clamp(min=1) - (policy_r - ref_r) / n_r.clamp(min=1)
        return (delta - 1 / (2 * beta)) ** 2
    z = beta * ((policy_c - ref_c) - (policy_r - ref_r))
    eps = label_smoothing
    if loss == "sigmoid":
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if loss == "hinge":
        return torch.relu(1 - z)
    if loss == "robust":
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    raise ValueError(f"unknown DPO loss {loss!r}")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable on both sides of −log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(mean_c: torch.Tensor, mean_r: torch.Tensor) -> torch.Tensor:
    """log odds(c) − log odds(r) from the per-token mean log-probabilities of the answers."""
    return (mean_c - mean_r) - (_log1mexp(mean_c) - _log1mexp(mean_r))


class PreferenceLoss(LossModule):
    """The model with a preference objective as its forward: `module(batch) -> (loss, pairs)`. With the
    step's NORMS in the batch the loss is this micro batch's share of the global batch's mean (times the
    ranks, which DDP averages over); without (validation) it is the micro batch's mean times its pairs,
    so mean_loss's pooled mean is the mean per pair. It keeps the batch's summed STATS for the step."""

    def __init__(self, model: torch.nn.Module, cfg, chunk_rows: int = CHUNK_ROWS):
        super().__init__(model, chunk_rows)
        self.objective, self.beta, self.dpo_loss = cfg.objective, cfg.beta, cfg.dpo_loss
        self.label_smoothing, self.orpo_lambda = cfg.label_smoothing, cfg.orpo_lambda
        self.stats = dict.fromkeys(STATS, 0.0)

    @staticmethod
    def counts(batch: dict) -> tuple[float, float]:
        """(pairs, chosen answer tokens) of a collated micro batch: what the step sums before dividing."""
        n = batch["input_ids"].shape[0] // 2
        return float(n), float((batch["labels"][:n, 1:] != IGNORE_INDEX).sum())

    def take_stats(self) -> dict:
        out, self.stats = self.stats, dict.fromkeys(STATS, 0.0)
        return out

    def forward(self, batch: dict) -> tuple[torch.Tensor, int]:
        if PAIRS not in batch:  # plain examples (a task's held-out answers): the SFT loss, (sum, label tokens)
            return super().forward(batch)
        n = batch["input_ids"].shape[0] // 2
        logps, lengths = sequence_logps(self.model, batch, self.chunk_rows)
        pc, pr, nc, nr = logps[:n], logps[n:], lengths[:n], lengths[n:]
        norms = batch.get(NORMS)
        pairs, tokens = (float(norms[0]), float(norms[1])) if norms is not None else (n, float(nc.sum()))
        if self.objective == "dpo":
            with torch.no_grad(), lora_disabled(self.model):
                ref, _ = sequence_logps(self.model, batch, self.chunk_rows)
            rc, rr = ref[:n], ref[n:]
            per_pair = dpo_losses(pc, pr, rc, rr, beta=self.beta, loss=self.dpo_loss,
                                  label_smoothing=self.label_smoothing, n_c=nc, n_r=nr)
            loss = per_pair.sum() / pairs
            margin = self.beta * ((pc - rc) - (pr - rr)).detach()
        else:
            log_odds = orpo_log_odds(pc / nc.clamp(min=1), pr / nr.clamp(min=1))
            loss = -pc.sum() / tokens - self.orpo_lambda * F.logsigmoid(log_odds).sum() / pairs
            # TRL's ORPO rewards: λ · the policy's per-token mean log-probabilities
            margin = self.orpo_lambda * (pc / nc.clamp(min=1) - pr / nr.clamp(min=1)).detach()
        self.stats["reward_accuracy"] += float((margin > 0).sum())
        self.stats["reward_margin"] += float(margin.sum())
        self.stats["policy_accuracy"] += float((pc > pr).sum())
        if norms is None:
            return loss * n, n
        return loss, n


def loss_module(model: torch.nn.Module, cfg) -> LossModule:
    """The unit the loop trains (and DDP wraps): the SFT loss, or the objective's (cfg: the TrainConfig)."""
    return LossModule(model) if cfg.objective == "sft" else PreferenceLoss(model, cfg)
