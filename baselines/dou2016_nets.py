"""The two networks of Dou et al. 2016 (3D CNN cascade), in PyTorch.

Layer structure from the paper's table as commonly reproduced (reference notes, section 3.1,
"verify against TMI Table I"); all convolutions are *valid* (no padding), ReLU after every
hidden layer, dropout before the last layer.

- :class:`ScreeningFCN` (stage 1): conv ``c1`` @ 5x5x3 -> max-pool 2 -> conv ``c2`` @ 3x3x3 ->
  "FC" ``f`` -> 2 classes. Trained as a patch classifier on 16 x 16 x 10 patches; the FC layer
  is written as a 4x4x2 convolution (the size of the feature map a 16 x 16 x 10 patch leaves),
  so the same weights apply fully convolutionally to a whole volume: the output voxel ``o``
  scores the input patch that starts at ``2 o`` (stride 2, one pooling), whose centre voxel is
  ``2 o + (8, 8, 5)`` (the voxel just after the middle of the even-sized patch, the same
  convention as the training crops of :func:`cmbbench_baselines.deep_common.crop`).
- :class:`DiscriminationCNN` (stage 2): conv ``c1`` @ 5x5x3 -> max-pool 2 -> conv ``c2`` @
  3x3x3 -> conv ``c3`` @ 3x3x1 -> FC ``f1`` -> FC ``f2`` -> 2 classes, on 20 x 20 x 16 patches.

The paper's widths are ``c = 64`` and FC 150 (stage 1) / 500, 100 (stage 2) and are the
defaults here; the shipped recipe narrows them for the CPU budget (recorded in the checkpoint).
Array axes are ``[i, j, k]`` with ``k`` the slice axis (the 3 of 5x5x3 is along ``k``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["DISCR_PATCH", "SCREEN_PATCH", "DiscriminationCNN", "ScreeningFCN", "discriminate",
           "screen_volume", "screening_output_shape"]

SCREEN_PATCH = (16, 16, 10)
DISCR_PATCH = (20, 20, 16)


def screening_output_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """Shape of the screening score map of an input of ``shape`` voxels (``0`` where the input
    is smaller than a 16 x 16 x 10 patch)."""
    out = []
    for n, (k1, k2, kf) in zip(shape, ((5, 3, 4), (5, 3, 4), (3, 3, 2))):
        m = (int(n) - k1 + 1) // 2 - k2 + 1 - kf + 1
        out.append(max(m, 0))
    return tuple(out)


class ScreeningFCN(nn.Module):
    """Stage-1 screening network, fully convolutional.

    Parameters
    ----------
    c1, c2
        Channels of the two convolutions (paper: 64, 64).
    fc
        Width of the fully connected layer, here a 4x4x2 convolution (paper: 150).
    dropout
        Dropout probability before the output layer.
    """

    patch = SCREEN_PATCH
    stride = 2

    def __init__(self, c1: int = 64, c2: int = 64, fc: int = 150, dropout: float = 0.3) -> None:
        super().__init__()
        self.config = {"c1": int(c1), "c2": int(c2), "fc": int(fc), "dropout": float(dropout)}
        self.features = nn.Sequential(
            nn.Conv3d(1, c1, (5, 5, 3)), nn.ReLU(inplace=True), nn.MaxPool3d(2),
            nn.Conv3d(c1, c2, (3, 3, 3)), nn.ReLU(inplace=True),
            nn.Conv3d(c2, fc, (4, 4, 2)), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Conv3d(fc, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, I, J, K)`` -> logits ``(B, 2) + screening_output_shape((I, J, K))``."""
        return self.features(x)

    @staticmethod
    def centre_of(out_index: np.ndarray) -> np.ndarray:
        """Input voxel coordinates ``2 o + (8, 8, 5)`` (``(N, 3)`` int) of the centre voxels of
        the patches scored by score-map indices ``out_index`` ``(N, 3)``."""
        o = np.atleast_2d(np.asarray(out_index, dtype=np.int64))
        return 2 * o + np.array(SCREEN_PATCH, dtype=np.int64) // 2


class DiscriminationCNN(nn.Module):
    """Stage-2 discrimination network on 20 x 20 x 16 patches.

    Parameters
    ----------
    c1, c2, c3
        Channels of the three convolutions (paper: 64 each).
    f1, f2
        Widths of the fully connected layers (paper: 500, 100).
    dropout
        Dropout probability after each fully connected layer.
    """

    patch = DISCR_PATCH

    def __init__(self, c1: int = 64, c2: int = 64, c3: int = 64, f1: int = 500, f2: int = 100,
                 dropout: float = 0.3) -> None:
        super().__init__()
        self.config = {"c1": int(c1), "c2": int(c2), "c3": int(c3), "f1": int(f1),
                       "f2": int(f2), "dropout": float(dropout)}
        self.features = nn.Sequential(
            nn.Conv3d(1, c1, (5, 5, 3)), nn.ReLU(inplace=True), nn.MaxPool3d(2),
            nn.Conv3d(c1, c2, (3, 3, 3)), nn.ReLU(inplace=True),
            nn.Conv3d(c2, c3, (3, 3, 1)), nn.ReLU(inplace=True))
        # 20x20x16 -> 16x16x14 -> 8x8x7 -> 6x6x5 -> 4x4x5
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c3 * 4 * 4 * 5, f1), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(f1, f2), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(f2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 20, 20, 16)`` -> logits ``(B, 2)``."""
        if tuple(x.shape[2:]) != DISCR_PATCH:
            raise ValueError(f"discrimination patches are {DISCR_PATCH}, got {tuple(x.shape[2:])}")
        return self.classifier(self.features(x))


# ---------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def screen_volume(net: ScreeningFCN, image: np.ndarray, *, tile_out: int = 24) -> np.ndarray:
    """Stage-1 CMB probability at every position of the score map (stride 2).

    The volume is processed in slabs along axis ``i`` of ``tile_out`` score-map rows, each with
    the 14 extra input rows its receptive field needs, so the result is exactly the one-pass
    fully convolutional map at a bounded memory cost.

    Parameters
    ----------
    net
        The screening network (set to eval mode here).
    image
        Normalised working-grid image ``[i, j, k]``.

    Returns
    -------
    numpy.ndarray
        ``screening_output_shape(image.shape)`` float32 map of P(CMB); index ``o`` scores the
        patch centred at input voxel :meth:`ScreeningFCN.centre_of` ``(o)``.
    """
    net.eval()
    out_shape = screening_output_shape(image.shape)
    res = np.zeros(out_shape, dtype=np.float32)
    if min(out_shape) <= 0:
        return res
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    span = SCREEN_PATCH[0] - 2  # extra input rows beyond 2 * rows
    for o0 in range(0, out_shape[0], tile_out):
        o1 = min(o0 + tile_out, out_shape[0])
        sub = x[2 * o0: 2 * (o1 - 1) + span + 2][None, None]
        logits = net(sub)
        prob = torch.softmax(logits, dim=1)[0, 1].numpy()
        res[o0:o1] = prob[: o1 - o0]
    return res


@torch.no_grad()
def discriminate(net: DiscriminationCNN, image: np.ndarray, centres: np.ndarray, *,
                 batch: int = 256) -> np.ndarray:
    """Stage-2 P(CMB) of 20 x 20 x 16 patches centred on ``centres`` (``(N, 3)`` working-grid
    voxels; padded with the image minimum outside the volume)."""
    from .deep_common import crop

    net.eval()
    centres = np.atleast_2d(np.asarray(centres, dtype=np.float64)).reshape(-1, 3)
    out = np.zeros(len(centres), dtype=np.float32)
    fill = float(image.min()) if image.size else 0.0
    for s in range(0, len(centres), batch):
        patches = np.stack([crop(image, c, DISCR_PATCH, fill) for c in centres[s:s + batch]])
        logits = net(torch.from_numpy(patches[:, None].astype(np.float32)))
        out[s:s + batch] = torch.softmax(logits, dim=1)[:, 1].numpy()
    return out
