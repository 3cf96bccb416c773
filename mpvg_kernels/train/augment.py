"""Batched preprocessing and augmentation on the training device (kornia), mixup/cutmix and the losses.

Train order: uint8 -> float [0, 1] -> random resized crop (or plain resize) to the input size -> horizontal flip
-> random affine -> RandAugment -> normalise -> random erasing -> mixup/cutmix (soft targets with label
smoothing). Held-out order: uint8 -> float -> resize to the input size (in-memory data) -> normalise.

All randomness comes from torch's global RNG (seeded per rank by the trainer, saved in checkpoints), so a
resumed run draws exactly the same augmentations as an uninterrupted one.

Differences from timm's DeiT pipeline, by design or because kornia works that way:
- kornia's RandAugment draws one sequence of ``n`` operations per call; it is applied per chunk of
  ``randaug_chunk`` images, so images in one chunk share the operations (magnitude ``m`` is timm's 0..10 scale,
  passed to kornia as ``3 m`` on its 0..30 scale; timm's ``mstd`` magnitude noise is not available).
- Random erasing fills the erased box with 0 after normalisation (the mean colour), timm's ``const`` mode,
  not its per-pixel noise.
- Random resized crop runs on the batch, after the loader brought folder images to a fixed square.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import channel_normalize, resize_batch
from .config import TrainConfig


class ChunkedRandAugment(nn.Module):
    """kornia's RandAugment applied to chunks of ``chunk`` images (one op sequence per chunk)."""

    def __init__(self, n: int, m: float, chunk: int = 8) -> None:
        super().__init__()
        from kornia.augmentation.auto import RandAugment

        # kornia's magnitude m is on a 0..30 scale (strictly inside): timm's m (0..10) x 3.
        self.ra = RandAugment(n=n, m=int(min(29, max(1, round(3 * m)))))
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.ra(c) for c in x.split(self.chunk)]).clamp_(0.0, 1.0)


def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with label smoothing: ``1 - s + s / K`` on the label, ``s / K`` elsewhere."""
    off = smoothing / num_classes
    out = torch.full((y.shape[0], num_classes), off, device=y.device, dtype=torch.float32)
    return out.scatter_(1, y.view(-1, 1), 1.0 - smoothing + off)


class MixupCutmix:
    """timm-style batch mixup/cutmix: partner = the batch reversed, ``lam ~ Beta(alpha, alpha)``.

    With both alphas > 0, cutmix is chosen with ``switch_prob``; the batch is mixed with probability ``prob``.
    Cutmix corrects ``lam`` to the actual pasted area. Returns soft targets (label smoothing folded in).
    """

    def __init__(self, mixup: float, cutmix: float, prob: float, switch_prob: float, num_classes: int,
                 smoothing: float) -> None:
        self.mixup, self.cutmix, self.prob, self.switch_prob = mixup, cutmix, prob, switch_prob
        self.num_classes, self.smoothing = num_classes, smoothing

    @property
    def enabled(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target = smooth_one_hot(y, self.num_classes, self.smoothing)
        if not self.enabled or float(torch.rand(())) >= self.prob:
            return x, target
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or float(torch.rand(())) < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        if use_cutmix:
            h, w = x.shape[-2:]
            cut = (1.0 - lam) ** 0.5
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
        else:
            x = x * lam + x.flip(0) * (1.0 - lam)
        return x, target * lam + target.flip(0) * (1.0 - lam)


class TrainTransform(nn.Module):
    """uint8 batch + int labels -> normalised augmented float batch + targets (int labels or soft [B, K])."""

    def __init__(self, cfg: TrainConfig, input_size: Sequence[int], channels: int, num_classes: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        import kornia.augmentation as K

        self.input_size = (int(input_size[0]), int(input_size[1]))
        aug = cfg.augment
        self.rrc = (K.RandomResizedCrop(self.input_size, scale=tuple(cfg.rrc_scale), ratio=tuple(cfg.rrc_ratio),
                                        p=1.0) if aug and cfg.rrc_scale is not None else None)
        pixel_ops: list[nn.Module] = []
        if aug and cfg.hflip > 0:
            pixel_ops.append(K.RandomHorizontalFlip(p=cfg.hflip))
        if aug and (cfg.affine_degrees > 0 or cfg.affine_translate > 0 or cfg.affine_scale is not None):
            pixel_ops.append(K.RandomAffine(
                degrees=cfg.affine_degrees,
                translate=(cfg.affine_translate, cfg.affine_translate) if cfg.affine_translate > 0 else None,
                scale=tuple(cfg.affine_scale) if cfg.affine_scale is not None else None,
                p=1.0,
            ))
        if aug and cfg.randaug_n > 0:
            pixel_ops.append(ChunkedRandAugment(cfg.randaug_n, cfg.randaug_m, cfg.randaug_chunk))
        self.pixel_ops = nn.Sequential(*pixel_ops)
        self.normalize = channel_normalize(mean, std, channels)
        self.erase = K.RandomErasing(p=cfg.reprob, value=0.0) if aug and cfg.reprob > 0 else None
        self.mix = MixupCutmix(cfg.mixup if aug else 0.0, cfg.cutmix if aug else 0.0, cfg.mixup_prob,
                               cfg.mixup_switch_prob, num_classes, cfg.label_smoothing)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float() / 255.0
        x = self.rrc(x) if self.rrc is not None else resize_batch(x, self.input_size)
        x = self.pixel_ops(x)
        x = self.normalize(x)
        if self.erase is not None:
            x = self.erase(x)
        if self.mix.enabled:
            return self.mix(x, y)
        return x.contiguous(), y


def classification_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy in fp32: soft targets ``[B, K]`` (mixup) or int labels with label smoothing."""
    logits = logits.float()
    if target.ndim == 2:  # class probabilities, smoothing already folded in
        return F.cross_entropy(logits, target)
    return F.cross_entropy(logits, target, label_smoothing=smoothing)
