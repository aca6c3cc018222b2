"""On-the-fly augmentation of a batch of patches (torch, CPU).

Sampled crops are larger than the network patch (``crop = ceil(1.3 * patch)``) so that the
spatial transform never pulls in padding at the patch corners. Per sample:

- **spatial**: rotation (+-15 deg about each axis), isotropic scaling (0.85-1.2), random
  flips of each axis, elastic deformation (a 4^3 grid of random displacements, sd
  ``elastic_vox`` voxels, upsampled trilinearly); images linear, labels nearest.
- **intensity**: gamma (0.7-1.5 on the min-max range), multiplicative smooth bias field
  (log-amplitude sd 0.2), Gaussian noise (sd 0-0.25 of the normalised scale), Gaussian blur
  (sigma 0-1 voxel).
- **resolution**: simulated thick slices (probability 0.3): averaging over 2-5 voxels along
  one axis (mostly the last) then linear re-upsampling, as a 2-5 mm slice acquisition.
- **sequence**: the training sets hold both SWI and T2*; in addition a random monotone
  contrast remap ``x + a tanh(x / 2)`` (``a`` in [-0.8, 0.8]) changes the tissue contrast
  between GM, WM and CSF as between GRE magnitude and phase-masked SWI, while keeping dark
  blobs dark.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["augment_batch"]


def _rot(angles: torch.Tensor) -> torch.Tensor:
    ax, ay, az = angles
    cx, sx, cy, sy, cz, sz = (torch.cos(ax), torch.sin(ax), torch.cos(ay), torch.sin(ay),
                              torch.cos(az), torch.sin(az))
    one, zero = torch.ones(()), torch.zeros(())
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx]).reshape(3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy]).reshape(3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one]).reshape(3, 3)
    return rz @ ry @ rx


def _gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.3:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()
    for d in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + d] = 2 * r + 1
        pad = [0] * 6
        pad[2 * (2 - d)] = pad[2 * (2 - d) + 1] = r
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.reshape(shape))
    return x


def augment_batch(img: torch.Tensor, lab: torch.Tensor, patch: int, g: torch.Generator, *,
                  p_spatial: float = 0.8, elastic_vox: float = 1.5, p_thick: float = 0.3,
                  p_seq: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``img`` (B,1,C,C,C) float, ``lab`` (B,C,C,C) int -> augmented (B,1,P,P,P), (B,P,P,P)."""

    def u(lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand((), generator=g))

    b, crop = img.shape[0], img.shape[-1]
    outs_i, outs_l = [], []
    for n in range(b):
        x = img[n:n + 1]
        y = lab[n:n + 1, None].float()
        theta = torch.eye(3)
        if u(0, 1) < p_spatial:
            ang = torch.tensor([u(-1, 1) for _ in range(3)]) * math.radians(15)
            theta = _rot(ang) / u(0.85, 1.2)
        flips = torch.tensor([-1.0 if u(0, 1) < 0.5 else 1.0 for _ in range(3)])
        theta = theta * flips[None, :]
        theta = theta * (patch / crop)  # sample the central patch of the crop
        aff = torch.cat([theta, torch.zeros(3, 1)], 1)[None]
        grid = F.affine_grid(aff, (1, 1, patch, patch, patch), align_corners=False)
        if elastic_vox > 0 and u(0, 1) < 0.5:
            coarse = torch.randn((1, 3, 4, 4, 4), generator=g) * (2 * elastic_vox / crop)
            disp = F.interpolate(coarse, size=(patch,) * 3, mode="trilinear",
                                 align_corners=True)
            grid = grid + disp.permute(0, 2, 3, 4, 1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        y = F.grid_sample(y, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        # resolution: thick slices
        if u(0, 1) < p_thick:
            k = int(torch.randint(2, 6, (), generator=g))
            axis = 2 if u(0, 1) < 0.7 else int(torch.randint(0, 2, (), generator=g))
            ks = [1, 1, 1]
            ks[axis] = k
            low = F.avg_pool3d(x, ks, stride=ks, ceil_mode=True)
            x = F.interpolate(low, size=(patch,) * 3, mode="trilinear", align_corners=False)
        # intensity
        if u(0, 1) < 0.3:
            x = _gauss_blur(x, u(0.3, 1.0))
        if u(0, 1) < p_seq:
            a = u(-0.8, 0.8)
            x = x + a * torch.tanh(x / 2)
        if u(0, 1) < 0.5:
            lo, hi = x.min(), x.max()
            rng = (hi - lo).clamp_min(1e-6)
            x = ((x - lo) / rng) ** u(0.7, 1.5) * rng + lo
        if u(0, 1) < 0.5:
            coarse = torch.randn((1, 1, 3, 3, 3), generator=g) * 0.2
            x = x * torch.exp(F.interpolate(coarse, size=(patch,) * 3, mode="trilinear",
                                            align_corners=True))
        if u(0, 1) < 0.5:
            x = x + torch.randn(x.shape, generator=g) * u(0.0, 0.25)
        outs_i.append(x)
        outs_l.append(y[:, 0].long())
    return torch.cat(outs_i), torch.cat(outs_l)
