"""A small 3D U-Net (instance norm, leaky ReLU, optional deep supervision)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UNet3D"]


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01, inplace=True))


class UNet3D(nn.Module):
    """U-Net with ``len(channels)`` levels; 2-class logits at full resolution.

    With ``deep_supervision`` the training forward also returns the logits of the coarser
    decoder levels (list, finest first); ``eval()`` always returns the finest logits only.
    Input sizes must be divisible by ``2 ** (levels - 1)``.
    """

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32), in_channels: int = 1,
                 n_classes: int = 2, deep_supervision: bool = False) -> None:
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.deep_supervision = bool(deep_supervision)
        self.enc = nn.ModuleList()
        cin = in_channels
        for c in self.channels:
            self.enc.append(_Block(cin, c))
            cin = c
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        self.heads = nn.ModuleList()
        for lo, hi in zip(self.channels[-2::-1], self.channels[:0:-1]):
            self.up.append(nn.ConvTranspose3d(hi, lo, 2, stride=2))
            self.dec.append(_Block(2 * lo, lo))
            self.heads.append(nn.Conv3d(lo, n_classes, 1))

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor):  # noqa: ANN201
        skips = []
        for n, block in enumerate(self.enc):
            if n:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        outs = []
        x = skips.pop()
        for up, dec, head in zip(self.up, self.dec, self.heads):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
            outs.append(head(x) if (self.deep_supervision and self.training) or
                        head is self.heads[-1] else None)
        if self.deep_supervision and self.training:
            return [o for o in outs[::-1] if o is not None]
        return outs[-1]
