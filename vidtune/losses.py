"""Losses the seed recipes tune. Each is a plain function of tensors; tests check each against a
hand computation (focal = cross-entropy at gamma 0, KD = Hinton's formula)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def inverse_sqrt_frequency(class_counts: np.ndarray) -> torch.Tensor:
    """Per-class weights ``1/sqrt(freq)``, normalised to mean 1 (classes absent in training get
    the largest weight rather than infinity)."""
    counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)
    w = 1.0 / np.sqrt(counts / counts.sum())
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gamma: float = 2.0,
    alpha: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean over the batch of ``alpha_y * (1 - p_y)^gamma * CE`` (Lin et al. 2017).

    With ``gamma = 0`` and no ``alpha`` this is exactly ``F.cross_entropy``.
    """
    logits = logits.float()
    ce = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)  # (B,)
    p_true = torch.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)  # (B,)
    loss = (1.0 - p_true).clamp(min=0).pow(gamma) * ce if gamma else ce
    if alpha is not None:
        loss = alpha.to(logits.device)[labels] * loss
    return loss.mean()


def mil_ranking_loss(clip_scores: torch.Tensor, abnormal: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Multiple-instance ranking (Sultani et al. 2018, as report 001 uses it): each clip is a bag
    of time steps scored by their max; abnormal bags should outscore normal ones by ``margin``:
    ``max(0, margin + mean(normal scores) - mean(abnormal scores))``. Zero when a batch lacks either."""
    abnormal = abnormal.bool()
    if abnormal.all() or not abnormal.any():
        return clip_scores.sum() * 0.0  # keeps the graph (DDP expects every parameter used)
    return F.relu(margin + clip_scores[~abnormal].mean() - clip_scores[abnormal].mean())


def vae_loss(recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float) -> torch.Tensor:
    """Reconstruction MSE + ``beta`` x KL(q(z|x) || N(0, I)), both averaged over the batch."""
    mse = F.mse_loss(recon.float(), target.float())
    kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
    return mse + beta * kl


def kd_response_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, batch mean."""
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    p_teacher = F.softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * t * t


def feature_distill_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """``1 - cos(student, teacher)``, batch mean: matches directions, as CLIP embeddings are compared."""
    return (1.0 - F.cosine_similarity(student_emb.float(), teacher_emb.float(), dim=1)).mean()
