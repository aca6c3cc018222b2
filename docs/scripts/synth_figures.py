"""Render the figures of docs/synthetic.md (PNG slices) from the real generator.

    python docs/scripts/synth_figures.py [--out docs/figures]

1. ``synth_swi_vs_t2s.png``: one subject, one CMB, as 3 T SWI (1.5 mm slices) and as 3 T 2D
   GRE T2* (3 mm slices); only the acquisition differs (generator overrides).
2. ``synth_slice_thickness.png``: the same CMB with 1 mm and 5 mm slices (3 T T2*).
3. ``synth_mimics.png``: a CMB beside a vein and a calcification on a uniform background
   (0.5 x 0.5 x 2 mm, 3 T, TE 20 ms): magnitude, high-pass phase and SWI. The calcification is
   dark on magnitude like the CMB but its phase has the opposite sign; the vein is a tube.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cmbbench.geometry import world_to_voxel  # noqa: E402
from cmbbench.synth import physics  # noqa: E402
from cmbbench.synth.generator import generate_scan  # noqa: E402
from cmbbench.synth.recipe import load_recipe  # noqa: E402

SUBJECT = 3  # index of the SYNTH-demo subject shown


def _crop(img: np.ndarray, centre: np.ndarray, half_mm: float, spacing: np.ndarray) -> np.ndarray:
    c = np.rint(centre).astype(int)
    h = np.ceil(half_mm / spacing[:2]).astype(int)
    lo0, lo1 = max(c[0] - h[0], 0), max(c[1] - h[1], 0)
    return img[lo0:c[0] + h[0] + 1, lo1:c[1] + h[1] + 1, c[2]]


def _show(ax, sl: np.ndarray, title: str, spacing: np.ndarray, vmax: float | None = None) -> None:
    ax.imshow(sl.T, cmap="gray", origin="lower", vmin=0, vmax=vmax,
              aspect=spacing[1] / spacing[0], interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _darkest_voxel_of_nearest_cmb(scan, world: np.ndarray) -> np.ndarray:
    """0-based voxel of the darkest voxel of the CMB nearest to ``world`` (mm) in ``scan``."""
    les = scan.lesions
    d = np.linalg.norm(les[["x_mm", "y_mm", "z_mm"]].to_numpy(float) - world, axis=1)
    lid = int(les.iloc[int(np.argmin(d))]["lesion_id"])
    vals = np.where(scan.labels == lid, scan.image.astype(np.float64), np.inf)
    return np.array(np.unravel_index(int(np.argmin(vals)), vals.shape), dtype=float)


def _same_cmb_scans(overrides_list: list[dict]) -> list:
    recipe = dataclasses.replace(load_recipe("SYNTH-demo"), positive_fraction=1.0)
    scans = [generate_scan(recipe, SUBJECT, overrides={**o, "n_cmb": 4}) for o in overrides_list]
    # the largest CMB of the first scan, located in every scan by its world position
    les = scans[0].lesions.sort_values("diameter_mm", ascending=False).iloc[0]
    world = les[["x_mm", "y_mm", "z_mm"]].to_numpy(float)
    return scans, world


def figure_swi_vs_t2s(out: Path) -> None:
    settings = [dict(protocol="swi_3t_3d", slice_thickness_mm=1.5, te_ms=20.0),
                dict(protocol="t2s_3t_2d", slice_thickness_mm=3.0, gap_mm=0.0, te_ms=20.0)]
    scans, world = _same_cmb_scans(settings)
    fig, axes = plt.subplots(2, 2, figsize=(8, 8))
    for col, (scan, s) in enumerate(zip(scans, settings)):
        sp = np.sqrt((scan.affine[:3, :3] ** 2).sum(axis=0))
        v = _darkest_voxel_of_nearest_cmb(scan, world)
        k = int(v[2])
        _show(axes[0, col], scan.image[:, :, k], f"{s['protocol']} ({scan.info['sequence']}), "
              f"{s['slice_thickness_mm']} mm", sp, vmax=1600)
        axes[0, col].plot(v[0], v[1], "o", mfc="none", mec="r", ms=14)
        _show(axes[1, col], _crop(scan.image, v, 15.0, sp), "30 mm around the CMB", sp, vmax=1600)
    fig.suptitle("Same subject and CMB: 3 T SWI vs 3 T 2D GRE T2*", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "synth_swi_vs_t2s.png", dpi=80)
    plt.close(fig)


def figure_slice_thickness(out: Path) -> None:
    settings = [dict(protocol="t2s_3t_2d", slice_thickness_mm=1.0, gap_mm=0.0, te_ms=20.0),
                dict(protocol="t2s_3t_2d", slice_thickness_mm=5.0, gap_mm=0.0, te_ms=20.0)]
    scans, world = _same_cmb_scans(settings)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    for col, (scan, s) in enumerate(zip(scans, settings)):
        sp = np.sqrt((scan.affine[:3, :3] ** 2).sum(axis=0))
        v = _darkest_voxel_of_nearest_cmb(scan, world)
        crop = _crop(scan.image, v, 15.0, sp)
        _show(axes[col], crop, f"T2* 3 T, {s['slice_thickness_mm']:g} mm slices", sp, vmax=1600)
    fig.suptitle("Contrast of the same CMB falls with slice thickness", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "synth_slice_thickness.png", dpi=80)
    plt.close(fig)


def figure_mimics(out: Path) -> None:
    shape = (100, 100, 12)
    spacing = np.array([0.5, 0.5, 2.0])
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -spacing * (np.array(shape) - 1) / 2.0
    b0, te, b0_dir = 3.0, 20.0, np.array([0.0, 0.0, 1.0])
    rng = np.random.default_rng(0)
    img = np.ones(shape, dtype=np.complex64)
    sources = [
        physics.SphereSource(np.array([0.0, 0.0, 0.0]), 0.5, 8.0),                # CMB
        physics.TubeSource(np.array([[5.0, -25.0, -8.0], [5.0, 25.0, 8.0]]), 0.35, 0.45,
                           r2s_per_s=60.0),                                        # vein
        physics.SphereSource(np.array([-8.0, 6.0, 0.0]), 1.0, -1.5, core_r2s_per_s=300.0,
                             core_pd_ratio=0.2),                                   # calcification
    ]
    for src in sources:
        sl, f = physics.voxel_factor(src, affine, shape, b0_dir, b0, te, slice_thickness_mm=2.0)
        img[sl] *= f
    noisy = physics.add_complex_noise(rng, img, 0.03)
    swi, hp = physics.swi_from_complex(noisy, spacing)
    k = shape[2] // 2
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
    _show(axes[0], np.abs(noisy)[:, :, k], "magnitude (T2*-weighted)", spacing, vmax=1.2)
    axes[1].imshow(hp[:, :, k].T, cmap="gray", origin="lower", vmin=-1.5, vmax=1.5)
    axes[1].set_title("high-pass phase (rad; paramagnetic negative)", fontsize=9)
    axes[1].set_xticks([])
    axes[1].set_yticks([])
    _show(axes[2], swi[:, :, k], "SWI (phase mask, n = 4)", spacing, vmax=1.2)
    for ax in axes:
        for label, (x, y) in (("CMB", (0.0, 0.0)), ("vein", (5.0, 0.0)), ("calc.", (-8.0, 6.0))):
            v = world_to_voxel(affine, np.array([x, y, 0.0]))
            ax.annotate(label, (v[0], v[1]), xytext=(v[0] + 6, v[1] + 10), color="yellow",
                        fontsize=8, arrowprops=dict(arrowstyle="-", color="yellow", lw=0.6))
    fig.suptitle("A CMB beside a vein and a calcification (3 T, TE 20 ms, 0.5 x 0.5 x 2 mm)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "synth_mimics.png", dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "figures")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    figure_swi_vs_t2s(args.out)
    figure_slice_thickness(args.out)
    figure_mimics(args.out)
    print(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
