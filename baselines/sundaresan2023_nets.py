"""Networks and losses of the Sundaresan et al. 2023 baseline, in PyTorch.

From the reference notes (section 3.2; the code is ``v-sundaresan/microbleed-detection``):

- :class:`CDetNet`, the candidate-detection network: a 1x1x1 convolution from the 2 input
  channels (inverted image, FRST) to 3 channels, then a shallow 3D U-Net with encoder widths
  ``64 -> 128 -> 256`` (two 2x down-samplings, two up-samplings with skip connections) and a
  2-class voxel output. Blocks are two 3x3x3 convolutions with batch normalisation and ReLU
  (our reading); up-sampling by 2x2x2 transposed convolutions. Inputs of any size are padded
  to a multiple of 4 inside :meth:`CDetNet.forward` and the output cropped back, so the output
  always has the input's spatial shape.
- :class:`TeacherNet`: the same encoder-decoder (segmentation output) plus a classification
  head on the bottleneck; :class:`StudentNet`: the encoder plus the classification head. The
  head averages the bottleneck over a 2x2x2 grid, flattens it and applies fully connected
  layers ``head`` (paper: 1024 -> 128 -> 32) and a 2-class output (pooling and where the 1024
  sits: our reading).
- :func:`kd_loss`: offline response-based knowledge distillation,
  ``alpha T^2 KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) CE(s, y)`` with T = 4 and
  alpha = 0.4 (paper), KL averaged over the batch.
- :func:`seg_loss`: voxel-weighted cross-entropy + soft Dice of the CMB class; the weights
  (computed by the sampler, :func:`voxel_weights`) are ``1 + gain * G_1.2 * y`` normalised to a
  peak of ``1 + gain`` (labels smoothed by a Gaussian of sigma 1.2 voxels, as in the paper; the
  gain 5 is ours).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

__all__ = ["CDetNet", "StudentNet", "TeacherNet", "kd_loss", "seg_loss", "voxel_weights"]


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout),
            nn.ReLU(inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout),
            nn.ReLU(inplace=True))


class _Encoder(nn.Module):
    """1x1x1 conv to 3 channels, then three blocks with 2x max-pooling between them."""

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.stem = nn.Conv3d(in_channels, 3, 1)
        w = [int(v) for v in widths]
        if len(w) != 3:
            raise ValueError(f"three encoder widths are needed, got {w}")
        self.blocks = nn.ModuleList([_Block(3, w[0]), _Block(w[0], w[1]), _Block(w[1], w[2])])
        self.pool = nn.MaxPool3d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        x = self.stem(x)
        for n, block in enumerate(self.blocks):
            if n:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        return skips


class _Decoder(nn.Module):
    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        w = [int(v) for v in widths]
        self.up2 = nn.ConvTranspose3d(w[2], w[1], 2, stride=2)
        self.dec2 = _Block(2 * w[1], w[1])
        self.up1 = nn.ConvTranspose3d(w[1], w[0], 2, stride=2)
        self.dec1 = _Block(2 * w[0], w[0])
        self.out = nn.Conv3d(w[0], 2, 1)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        s0, s1, s2 = skips
        x = self.dec2(torch.cat([self.up2(s2), s1], dim=1))
        x = self.dec1(torch.cat([self.up1(x), s0], dim=1))
        return self.out(x)


class _Head(nn.Module):
    """2x2x2 average pooling of the bottleneck, flatten, FC layers ``hidden``, 2 logits."""

    def __init__(self, channels: int, hidden: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.AdaptiveAvgPool3d(2), nn.Flatten()]
        cin = channels * 8
        for h in hidden:
            layers += [nn.Linear(cin, int(h)), nn.ReLU(inplace=True), nn.Dropout(0.2)]
            cin = int(h)
        layers.append(nn.Linear(cin, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _pad4(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    shape = tuple(x.shape[2:])
    pad = [(-n) % 4 for n in shape]
    if any(pad):
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
    return x, shape


class CDetNet(nn.Module):
    """Candidate-detection 3D U-Net: ``(B, C, I, J, K)`` -> logits ``(B, 2, I, J, K)``.

    Parameters
    ----------
    in_channels
        Input channels (2: inverted image and FRST).
    widths
        Encoder widths (paper: 64, 128, 256).
    """

    def __init__(self, in_channels: int = 2, widths: Sequence[int] = (64, 128, 256)) -> None:
        super().__init__()
        self.config = {"in_channels": int(in_channels), "widths": [int(w) for w in widths]}
        self.encoder = _Encoder(in_channels, widths)
        self.decoder = _Decoder(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, shape = _pad4(x)
        out = self.decoder(self.encoder(xp))
        return out[:, :, :shape[0], :shape[1], :shape[2]]


class TeacherNet(nn.Module):
    """Encoder-decoder with a segmentation output and a classification head on the bottleneck:
    ``(B, C, 24, 24, 24)`` -> (segmentation logits ``(B, 2, 24, 24, 24)``, class logits
    ``(B, 2)``)."""

    def __init__(self, in_channels: int = 2, widths: Sequence[int] = (64, 128, 256),
                 head: Sequence[int] = (1024, 128, 32)) -> None:
        super().__init__()
        self.config = {"in_channels": int(in_channels), "widths": [int(w) for w in widths],
                       "head": [int(h) for h in head]}
        self.encoder = _Encoder(in_channels, widths)
        self.decoder = _Decoder(widths)
        self.head = _Head(int(widths[-1]), head)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xp, shape = _pad4(x)
        skips = self.encoder(xp)
        seg = self.decoder(skips)[:, :, :shape[0], :shape[1], :shape[2]]
        return seg, self.head(skips[-1])


class StudentNet(nn.Module):
    """Encoder + classification head: ``(B, C, 24, 24, 24)`` -> class logits ``(B, 2)``."""

    def __init__(self, in_channels: int = 2, widths: Sequence[int] = (64, 128, 256),
                 head: Sequence[int] = (1024, 128, 32)) -> None:
        super().__init__()
        self.config = {"in_channels": int(in_channels), "widths": [int(w) for w in widths],
                       "head": [int(h) for h in head]}
        self.encoder = _Encoder(in_channels, widths)
        self.head = _Head(int(widths[-1]), head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, _ = _pad4(x)
        return self.head(self.encoder(xp)[-1])


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------

def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
            *, temperature: float = 4.0, alpha: float = 0.4) -> torch.Tensor:
    """Response-based knowledge-distillation loss (Hinton et al.), as in the paper.

    ``alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(student_logits, target)`` with
    ``p = softmax(logits / T)``, the KL divergence summed over classes and averaged over the
    batch, the cross-entropy averaged over the batch. The teacher is not differentiated.
    """
    t = float(temperature)
    log_ps = F.log_softmax(student_logits / t, dim=1)
    pt = F.softmax(teacher_logits.detach() / t, dim=1)
    kl = F.kl_div(log_ps, pt, reduction="batchmean")
    ce = F.cross_entropy(student_logits, target)
    return alpha * t * t * kl + (1.0 - alpha) * ce


def voxel_weights(target: np.ndarray, *, sigma: float = 1.2, gain: float = 5.0) -> np.ndarray:
    """Voxel weights ``1 + gain * G_sigma(y) / max G_sigma(y)`` of a binary target patch
    (``[i, j, k]``; all ones when the patch has no CMB voxel)."""
    y = np.asarray(target, dtype=np.float32)
    if not y.any():
        return np.ones(y.shape, dtype=np.float32)
    g = ndimage.gaussian_filter(y, sigma, mode="constant")
    return (1.0 + gain * g / max(float(g.max()), 1e-6)).astype(np.float32)


def seg_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
             *, eps: float = 1.0) -> torch.Tensor:
    """Voxel-weighted cross-entropy + soft Dice loss of the CMB class (pooled over the batch).

    Parameters
    ----------
    logits
        ``(B, 2, I, J, K)``.
    target
        ``(B, I, J, K)`` int (0/1).
    weights
        ``(B, I, J, K)`` voxel weights (:func:`voxel_weights`), or None for uniform.
    eps
        Dice smoothing (batches without CMB voxels give a loss proportional to the predicted
        CMB volume).
    """
    ce = F.cross_entropy(logits, target.long(), reduction="none")
    if weights is not None:
        ce = (ce * weights).sum() / weights.sum()
    else:
        ce = ce.mean()
    p = torch.softmax(logits, dim=1)[:, 1]
    t = target.float()
    dice = (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)
    return ce + (1.0 - dice)
