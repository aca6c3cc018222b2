"""Training of the Dou et al. 2016 cascade from a recipe
(``cmbbench train --method dou2016 --recipe dou2016-synth-v1``).

Steps (each resumable; output folder default ``runs/train/<recipe name>``):

1. **Data**: the recipe's ``train`` and ``val`` datasets (registry name + version, checked;
   SYNTH-test is refused), each scan prepared exactly as :meth:`Dou2016.predict
   <cmbbench_baselines.dou2016.Dou2016.predict>` prepares it (working grid, normalisation,
   mask); reference CMB centres from the lesion table, mapped to the working grid.
2. **Stage 1** (``screen``): 16 x 16 x 10 patches, a share ``pos_fraction`` centred on a
   reference CMB (jitter of up to ``jitter`` voxels in-plane, 1 through-plane), the rest on
   random foreground voxels; flips, in-plane 90 degree rotations, intensity jitter and noise;
   cross-entropy. Model selection: balanced cross-entropy on a fixed set of SYNTH-val patches
   (all val CMBs and ``val_negatives`` random foreground positions).
3. **Mining**: stage 1 over up to ``mine_scans`` training scans; its candidates
   (:func:`~cmbbench_baselines.dou2016.screening_candidates`, threshold 0.64) with no
   reference CMB within 5 mm (:func:`~cmbbench_baselines.dou2016.split_stage1`) are the hard
   negatives (``mined.npz``). The same is done once on the validation scans.
4. **Stage 2** (``discr``): 20 x 20 x 16 patches; positives at reference CMBs (jittered) or at
   stage-1 candidates that hit one; negatives a share ``hard_fraction`` from the hard
   negatives, the rest random; cross-entropy. Model selection: CPM of the whole cascade on the
   validation scans (stage-1 candidates computed once, re-scored by stage 2 and merged), under
   cmbbench's default rule.
5. The bundle ``<name>.pt`` (both networks) + ``<name>.json`` (recipe, datasets with versions
   and scan ids, stage curves, validation metrics, training time, hardware, sha256).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cmbbench.errors import ConfigurationError

from .deep_common import (
    PointSampler,
    TrainScan,
    augment_patch,
    crop,
    hardware,
    load_recipe,
    load_scans,
    run_stage,
    save_bundle,
    score_candidates,
)
from .dou2016 import (
    _grid_rule,
    merge_close,
    mine_hard_negatives,
    prepare_image,
    screening_box,
    screening_candidates,
    split_stage1,
)
from .dou2016_nets import (
    DISCR_PATCH,
    SCREEN_PATCH,
    DiscriminationCNN,
    ScreeningFCN,
    discriminate,
    screen_volume,
)

__all__ = ["train"]

log = logging.getLogger(__name__)


class _Sampler(PointSampler):
    """Batches of single-channel patches and their class labels."""

    def batch(self, size: tuple[int, int, int], n: int, *, pos_fraction: float, jitter: float,
              hard_fraction: float = 0.0, hit_fraction: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for _ in range(n):
            s, c, y = self.point(pos_fraction=pos_fraction, jitter=jitter,
                                 hard_fraction=hard_fraction, hit_fraction=hit_fraction)
            img = self.scans[s].image
            p = crop(img, c, size, float(img.min()))
            xs.append(augment_patch(p, self.rng))
            ys.append(y)
        return (torch.from_numpy(np.stack(xs)[:, None]),
                torch.tensor(ys, dtype=torch.long))


def _val_patches(scans: list[TrainScan], n_neg: int, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed stage-1 validation patches: every reference CMB + ``n_neg`` random positions."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for s in scans:
        for c in s.centres:
            xs.append(crop(s.image, c, SCREEN_PATCH, float(s.image.min())))
            ys.append(1)
    for _ in range(n_neg):
        s = scans[rng.integers(len(scans))]
        c = s.pool[rng.integers(len(s.pool))]
        xs.append(crop(s.image, c, SCREEN_PATCH, float(s.image.min())))
        ys.append(0)
    return torch.from_numpy(np.stack(xs)[:, None].astype(np.float32)), torch.tensor(ys)


def _balanced_ce(logits: torch.Tensor, y: torch.Tensor) -> float:
    ce = F.cross_entropy(logits, y, reduction="none")
    parts = [float(ce[y == k].mean()) for k in (0, 1) if (y == k).any()]
    return float(np.mean(parts))


def _screen_scan(net: ScreeningFCN, scan: TrainScan) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Stage-1 score map of a prepared scan over its mask's bounding box (as in predict):
    the map, the box's start voxel and the box."""
    lo, box = screening_box(scan.mask)
    return screen_volume(net, scan.image[box]), lo, box


def _stage1_candidates(net: ScreeningFCN, scan: TrainScan, threshold: float,
                       max_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage-1 candidates of a prepared scan (working-grid voxels, scores), as in predict."""
    if not scan.mask.any():
        return np.zeros((0, 3), np.int64), np.zeros(0, np.float32)
    smap, lo, box = _screen_scan(net, scan)
    c, s = screening_candidates(smap, threshold=threshold, mask=scan.mask[box],
                                max_candidates=max_candidates)
    return c + lo, s


def train(recipe: str | Path | dict, *, out: str | Path | None = None,
          init: str | Path | None = None, dataset: str | Path | None = None,
          steps: int | None = None, max_minutes: float | None = None, resume: bool = True,
          progress: Callable[[str], None] | None = None) -> Path:
    """Train the cascade from a recipe; returns the path of the checkpoint bundle.

    Parameters
    ----------
    recipe
        Recipe name (``recipes/<name>.yaml`` of this package), YAML path or mapping.
    out
        Output folder (default ``runs/train/<recipe name>``).
    init, dataset
        Not supported (the cascade is trained from scratch on the recipe's datasets).
    steps
        Override the step count of each stage.
    max_minutes
        Override the recipe's total wall-clock budget; the stage budgets scale with it.
    resume
        Continue an interrupted training in ``out``.
    """
    from cmbbench.methods.ours.training_data import open_split

    say = progress or log.info
    if init is not None or dataset is not None:
        raise ConfigurationError("dou2016 trains from scratch on its recipe's datasets; "
                                 "--init and --dataset are not supported")
    rec = load_recipe(recipe, method="dou2016")
    name = str(rec["name"])
    seed = int(rec.get("seed", 0))
    total = float(rec.get("max_minutes", 18))
    scale = float(max_minutes) / total if max_minutes is not None else 1.0
    s1, s2 = dict(rec.get("stage1") or {}), dict(rec.get("stage2") or {})
    mine = dict(rec.get("mining") or {})
    config = {"grid": dict(rec.get("grid") or {"grid_mm": [0.9, 0.9, 2.0], "tolerance": 1.25}),
              "screen": dict(rec.get("screen") or {}), "discr": dict(rec.get("discr") or {}),
              "threshold": float(mine.get("threshold", 0.64))}
    rule = _grid_rule(config)
    tr_ref, va_ref = open_split(rec["train"]), open_split(rec["val"])
    out = Path(out) if out else Path("runs") / "train" / name
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)
    t_start = time.perf_counter()


    def prep(image: np.ndarray, spacing: np.ndarray) -> tuple:
        return prepare_image(image, spacing, rule)

    train_scans = load_scans(tr_ref, prep, say=say)
    val_scans = load_scans(va_ref, prep, for_scoring=True, say=say)
    rng = np.random.default_rng(seed)
    sampler = _Sampler(train_scans, rng)
    if not sampler.cmbs:
        raise ConfigurationError(f"no reference CMB in the training scans of {tr_ref.name}")

    # ---- stage 1 ------------------------------------------------------------------------
    screen = ScreeningFCN(**config["screen"])
    config["screen"] = screen.config
    opt1 = torch.optim.Adam(screen.parameters(), lr=float(s1.get("lr", 1e-3)),
                            weight_decay=float(s1.get("weight_decay", 1e-5)))
    vx, vy = _val_patches(val_scans, int(s1.get("val_negatives", 2000)), seed + 1)

    def step1(_: int) -> float:
        xb, yb = sampler.batch(SCREEN_PATCH, int(s1.get("batch", 64)),
                               pos_fraction=float(s1.get("pos_fraction", 0.5)),
                               jitter=float(s1.get("jitter", 1.0)))
        loss = F.cross_entropy(screen(xb).flatten(1), yb)
        opt1.zero_grad(set_to_none=True)
        loss.backward()
        opt1.step()
        return float(loss.detach())

    @torch.no_grad()
    def val1() -> tuple[float, dict]:
        screen.eval()
        logits = torch.cat([screen(vx[i:i + 512]).flatten(1) for i in range(0, len(vx), 512)])
        p = torch.softmax(logits, 1)[:, 1]
        thr = config["threshold"]
        sens = float((p[vy == 1] > thr).float().mean()) if (vy == 1).any() else float("nan")
        fpr = float((p[vy == 0] > thr).float().mean())
        bce = _balanced_ce(logits, vy)
        return -bce, {"balanced_ce": bce, "patch_sensitivity": sens, "patch_fpr": fpr}

    r1 = run_stage("screen", screen, opt1, step1, out=out,
                   steps=int(steps or s1.get("steps", 10 ** 9)),
                   budget_s=60.0 * scale * float(s1.get("minutes", 6)), val_fn=val1,
                   val_every_s=60.0 * float(s1.get("val_every_minutes", 1.0)), rng=rng,
                   resume=resume, say=say)

    # ---- mining -------------------------------------------------------------------------
    thr = config["threshold"]
    max_c = int(mine.get("max_candidates", 300))
    mined = out / "mined.npz"
    t_mine = time.perf_counter()
    if resume and mined.is_file():
        z = np.load(mined)
        hard, hits = z["hard"], z["hits"]
        say(f"mining: reusing {mined} ({len(hard)} hard negatives)")
    else:
        hard_rows, hit_rows = [], []
        n_cand = n_ref = n_found = 0
        match_mm = float(mine.get("match_mm", 5.0))
        for n, sc in enumerate(train_scans[: int(mine.get("scans", 30))]):
            if not sc.mask.any():
                continue
            smap, lo, box = _screen_scan(screen, sc)
            fp_c, hit_c = mine_hard_negatives(smap, sc.centres, sc.grid.work_spacing,
                                              offset=lo, threshold=thr, mask=sc.mask[box],
                                              max_candidates=max_c, match_mm=match_mm)
            hard_rows += [(n, *v) for v in fp_c]
            hit_rows += [(n, *v) for v in hit_c]
            n_cand += len(fp_c) + len(hit_c)
            n_ref += len(sc.centres)
            if len(sc.centres) and len(hit_c):
                n_found += int((~split_stage1(sc.centres, hit_c, sc.grid.work_spacing,
                                              match_mm=match_mm)).sum())
        hard = np.asarray(hard_rows, dtype=np.int64).reshape(-1, 4)
        hits = np.asarray(hit_rows, dtype=np.int64).reshape(-1, 4)
        np.savez(mined, hard=hard, hits=hits)
        say(f"mining: {n_cand} stage-1 candidates, {len(hard)} false positives, stage-1 "
            f"recall {n_found}/{n_ref} on the mined training scans "
            f"({time.perf_counter() - t_mine:.0f} s)")
    sampler.hard = [(int(r[0]), r[1:].astype(np.float64)) for r in hard]
    sampler.hits = [(int(r[0]), r[1:].astype(np.float64)) for r in hits]
    val_cands = [_stage1_candidates(screen, sc, thr, max_c) for sc in val_scans]
    n_val_ref = sum(len(s.centres) for s in val_scans)
    n_val_found = sum(int((~split_stage1(s.centres, c, s.grid.work_spacing)).sum())
                      for s, (c, _) in zip(val_scans, val_cands) if len(c) and len(s.centres))
    stage1_val = {"candidates_per_scan": float(np.mean([len(c) for c, _ in val_cands])),
                  "recall": n_val_found / max(n_val_ref, 1)}
    say(f"stage 1 on the validation scans: {stage1_val}")

    # ---- stage 2 ------------------------------------------------------------------------
    discr = DiscriminationCNN(**config["discr"])
    config["discr"] = discr.config
    opt2 = torch.optim.Adam(discr.parameters(), lr=float(s2.get("lr", 1e-3)),
                            weight_decay=float(s2.get("weight_decay", 1e-5)))

    def step2(_: int) -> float:
        xb, yb = sampler.batch(DISCR_PATCH, int(s2.get("batch", 64)),
                               pos_fraction=float(s2.get("pos_fraction", 0.5)),
                               jitter=float(s2.get("jitter", 1.0)),
                               hard_fraction=float(s2.get("hard_fraction", 0.75)),
                               hit_fraction=float(s2.get("hit_fraction", 0.3)))
        loss = F.cross_entropy(discr(xb), yb)
        opt2.zero_grad(set_to_none=True)
        loss.backward()
        opt2.step()
        return float(loss.detach())

    merge_vox = float(rec.get("merge_vox", 10.0))

    def cascade_val_candidates() -> list[pd.DataFrame]:
        tables = []
        for sc, (c, _) in zip(val_scans, val_cands):
            if not len(c):
                tables.append(pd.DataFrame({"i": [], "j": [], "k": [], "score": []}))
                continue
            p = discriminate(discr, sc.image, c)
            keep = merge_close(c, p, sc.grid.work_spacing, merge_vox=merge_vox)
            nat = sc.grid.work_to_native(c[keep])
            tables.append(pd.DataFrame({"i": nat[:, 0], "j": nat[:, 1], "k": nat[:, 2],
                                        "score": np.minimum(p[keep], 0.999)}))
        return tables

    def val2() -> tuple[float, dict]:
        m = score_candidates([s.val for s in val_scans], cascade_val_candidates())
        return (m["cpm"] if np.isfinite(m["cpm"]) else -1.0), m

    r2 = run_stage("discr", discr, opt2, step2, out=out,
                   steps=int(steps or s2.get("steps", 10 ** 9)),
                   budget_s=60.0 * scale * float(s2.get("minutes", 6)), val_fn=val2,
                   val_every_s=60.0 * float(s2.get("val_every_minutes", 1.5)), rng=rng,
                   resume=resume, say=say)
    final = val2()[1]
    say(f"cascade on the validation scans: {json.dumps(final)}")
    meta = {
        "method": "dou2016",
        "recipe": {k: v for k, v in rec.items() if not k.startswith("_")},
        "recipe_file": rec.get("_path"), "seed": seed,
        "datasets": {"train": tr_ref.record(), "val": va_ref.record()},
        "command": f"cmbbench train --method dou2016 --recipe {name}",
        "stages": {r.name: {"steps": r.steps, "seconds": r.seconds, "best": r.best,
                            "curve": r.curve} for r in (r1, r2)},
        "mining": {"hard_negatives": len(sampler.hard), "hits": len(sampler.hits)},
        "stage1_val": stage1_val, "val": final,
        "training_seconds": round(time.perf_counter() - t_start, 1),
        "hardware": hardware(),
    }
    path = out / f"{name}.pt"
    save_bundle(path, {"screen": screen, "discr": discr}, config, meta)
    say(f"checkpoint {path} (val CPM {final['cpm']:.3f})")
    return path
