"""Training of the Sundaresan et al. 2023 baseline from a recipe
(``cmbbench train --method sundaresan2023 --recipe sundaresan2023-synth-v1``).

Steps (each resumable; output folder default ``runs/train/<recipe name>``):

1. **Data**: the recipe's ``train`` and ``val`` datasets (registry name + version checked;
   SYNTH-test refused), prepared exactly as :meth:`Sundaresan2023.predict
   <cmbbench_baselines.sundaresan2023.Sundaresan2023.predict>` prepares them (working grid,
   vessel inpainting, inverted image + FRST channels), instance labels resampled to the
   working grid (no CMB lost).
2. **CDetNet** (``cdet``): two-channel training crops of ``patch`` voxels (48 in the paper;
   the network is fully convolutional and always applied to 48^3 patches), a share ``pos_fraction`` containing a
   reference CMB (centred on it with jitter up to ``jitter`` voxels), the rest around random
   brain voxels; flips, in-plane 90 degree rotations, intensity jitter on channel 0; loss
   :func:`~cmbbench_baselines.sundaresan2023_nets.seg_loss` with voxel-weight gain
   ``weight_gain``. Model selection: CPM of the
   candidates (components of P > 0.2 scored by their peak) on the validation scans.
3. **Mining**: CDetNet over up to ``mining.scans`` training scans; components whose centroid
   has no reference CMB within 5 mm are the hard negatives, the others hits; the same once on
   the validation scans, with the clean-up applied, for the next two stages' model selection.
4. **Teacher** (``teacher``): optionally (``init_from_cdet``) initialised with CDetNet's
   encoder-decoder weights; 24^3 patches; positives at reference CMBs (jittered) or hits,
   negatives mostly hard negatives (``hard_fraction``), the rest random; loss seg_loss (the
   patch's CMB mask) + cross-entropy of the class. Model selection: CPM of the cascade with the
   teacher's class probability as the score.
5. **Student** (``student``): optionally initialised with CDetNet's encoder; same patches; loss
   :func:`~cmbbench_baselines.sundaresan2023_nets.kd_loss` against the frozen teacher (T = 4,
   alpha = 0.4). Model selection: CPM with the student.
6. The bundle ``<name>.pt`` (cdet, teacher, student) + ``<name>.json`` (recipe, datasets with
   versions and scan ids, stage curves, validation metrics, training time, hardware, sha256).
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
from .dou2016 import split_stage1
from .sundaresan2023 import (
    CLASSIFY_PATCH,
    DETECT_PATCH,
    _grid_rule,
    candidate_components,
    classify_candidates,
    detect_volume,
)
from .sundaresan2023_nets import (
    CDetNet,
    StudentNet,
    TeacherNet,
    kd_loss,
    seg_loss,
    voxel_weights,
)
from .sundaresan2023_prep import PrepConfig, cleanup_components, prepare_channels

__all__ = ["train"]

log = logging.getLogger(__name__)


class _Sampler(PointSampler):
    """Patch sampler: ``(x [C, P, P, P], target [P, P, P], label)`` triples."""

    def draw(self, size: int, *, pos_fraction: float, jitter: float,
             hard_fraction: float = 0.0, hit_fraction: float = 0.0
             ) -> tuple[np.ndarray, np.ndarray, int]:
        s, c, y = self.point(pos_fraction=pos_fraction, jitter=jitter,
                             hard_fraction=hard_fraction, hit_fraction=hit_fraction)
        sc = self.scans[s]
        both = np.concatenate([sc.image, (sc.labels > 0)[None].astype(np.float32)])
        p = augment_patch(crop(both, c, (size,) * 3, 0.0), self.rng)
        return p[:-1], (p[-1] > 0.5).astype(np.int64), y

    def batch(self, size: int, n: int, *, gain: float = 5.0, **kw: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, ts, ws, ys = [], [], [], []
        for _ in range(n):
            x, t, y = self.draw(size, **kw)
            xs.append(x)
            ts.append(t)
            ws.append(voxel_weights(t, gain=gain))
            ys.append(y)
        return (torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ts)),
                torch.from_numpy(np.stack(ws)), torch.tensor(ys, dtype=torch.long))


def _components(net: CDetNet, sc: TrainScan, thr: float, cleanup: bool, boundary_vox: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """CDetNet candidates of a prepared scan: centroids (working grid) and peaks, after the
    clean-up when asked (as in predict)."""
    prob = detect_volume(net, sc.image, sc.mask)
    labels, cents, peaks = candidate_components(prob, threshold=thr)
    if cleanup and len(cents):
        labels = cleanup_components(labels, sc.mask, boundary_vox=boundary_vox)
        alive = np.zeros(len(cents) + 1, dtype=bool)
        alive[np.unique(labels[labels > 0])] = True
        cents, peaks = cents[alive[1:]], peaks[alive[1:]]
    return cents, peaks


def _table(sc: TrainScan, cents: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    if not len(cents):
        return pd.DataFrame({"i": [], "j": [], "k": [], "score": []})
    nat = sc.grid.work_to_native(cents)
    return pd.DataFrame({"i": nat[:, 0], "j": nat[:, 1], "k": nat[:, 2],
                         "score": np.minimum(scores, 0.999)})


def train(recipe: str | Path | dict, *, out: str | Path | None = None,
          init: str | Path | None = None, dataset: str | Path | None = None,
          steps: int | None = None, max_minutes: float | None = None, resume: bool = True,
          progress: Callable[[str], None] | None = None) -> Path:
    """Train the three networks from a recipe; returns the path of the checkpoint bundle.

    Parameters are those of :func:`cmbbench_baselines.dou2016_train.train` (``init`` and
    ``dataset`` are not supported; ``steps`` overrides every stage's step count;
    ``max_minutes`` scales every stage's budget).
    """
    from cmbbench.methods.ours.training_data import open_split

    say = progress or log.info
    if init is not None or dataset is not None:
        raise ConfigurationError("sundaresan2023 trains from scratch on its recipe's datasets; "
                                 "--init and --dataset are not supported")
    rec = load_recipe(recipe, method="sundaresan2023")
    name = str(rec["name"])
    seed = int(rec.get("seed", 0))
    total = float(rec.get("max_minutes", 18))
    scale = float(max_minutes) / total if max_minutes is not None else 1.0
    st = {k: dict(rec.get(k) or {}) for k in ("cdet_stage", "teacher_stage", "student_stage",
                                              "mining")}
    prep_cfg = PrepConfig.from_dict(rec.get("prep"))
    config = {"grid": dict(rec.get("grid") or {"grid_mm": [0.9, 0.9, 2.0], "tolerance": 1.25}),
              "prep": prep_cfg.to_dict(), "cdet": dict(rec.get("cdet") or {}),
              "teacher": dict(rec.get("teacher") or {}), "student": dict(rec.get("student") or {}),
              "cdet_threshold": float(rec.get("cdet_threshold", 0.2)),
              "kd": {"temperature": float(rec.get("kd", {}).get("temperature", 4.0)),
                     "alpha": float(rec.get("kd", {}).get("alpha", 0.4))}}
    rule = _grid_rule(config)
    thr = config["cdet_threshold"]
    boundary_vox = float(rec.get("boundary_vox", 8.0))
    tr_ref, va_ref = open_split(rec["train"]), open_split(rec["val"])
    out = Path(out) if out else Path("runs") / "train" / name
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)
    t_start = time.perf_counter()


    def prep(image: np.ndarray, spacing: np.ndarray) -> tuple:
        return prepare_channels(image, spacing, rule, prep_cfg)

    train_scans = load_scans(tr_ref, prep, want_labels=True, say=say)
    val_scans = load_scans(va_ref, prep, for_scoring=True, say=say)
    rng = np.random.default_rng(seed)
    sampler = _Sampler(train_scans, rng)
    if not sampler.cmbs:
        raise ConfigurationError(f"no reference CMB in the training scans of {tr_ref.name}")

    def adam(net: torch.nn.Module, cfg: dict) -> torch.optim.Optimizer:
        return torch.optim.Adam(net.parameters(), lr=float(cfg.get("lr", 1e-3)),
                                weight_decay=float(cfg.get("weight_decay", 1e-5)))

    def stage_kw(cfg: dict) -> dict:
        return {"steps": int(steps or cfg.get("steps", 10 ** 9)),
                "budget_s": 60.0 * scale * float(cfg.get("minutes", 3)),
                "val_every_s": 60.0 * float(cfg.get("val_every_minutes", 1.5)),
                "rng": rng, "resume": resume, "say": say, "out": out,
                "log_every": int(cfg.get("log_every", 20))}

    # ---- CDetNet --------------------------------------------------------------------------
    cdet = CDetNet(**config["cdet"])
    config["cdet"] = cdet.config
    c_cfg = st["cdet_stage"]
    opt = adam(cdet, c_cfg)

    def step_cdet(_: int) -> float:
        x, t, w, _y = sampler.batch(int(c_cfg.get("patch", DETECT_PATCH)),
                                    int(c_cfg.get("batch", 4)),
                                    gain=float(c_cfg.get("weight_gain", 5.0)),
                                    pos_fraction=float(c_cfg.get("pos_fraction", 0.5)),
                                    jitter=float(c_cfg.get("jitter", 12.0)))
        loss = seg_loss(cdet(x), t, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def val_cdet() -> tuple[float, dict]:
        tables = []
        for sc in val_scans:
            cents, peaks = _components(cdet, sc, thr, False, boundary_vox)
            tables.append(_table(sc, cents, peaks))
        m = score_candidates([s.val for s in val_scans], tables)
        return (m["cpm"] if np.isfinite(m["cpm"]) else -1.0), m

    r_cdet = run_stage("cdet", cdet, opt, step_cdet, val_fn=val_cdet, **stage_kw(c_cfg))

    # ---- mining ---------------------------------------------------------------------------
    m_cfg = st["mining"]
    mined = out / "mined.npz"
    t_mine = time.perf_counter()
    if resume and mined.is_file():
        z = np.load(mined)
        hard, hits = z["hard"], z["hits"]
        say(f"mining: reusing {mined} ({len(hard)} hard negatives)")
    else:
        hard_rows, hit_rows = [], []
        for n, sc in enumerate(train_scans[: int(m_cfg.get("scans", 30))]):
            cents, _ = _components(cdet, sc, thr, False, boundary_vox)
            fp = split_stage1(cents, sc.centres, sc.grid.work_spacing,
                              match_mm=float(m_cfg.get("match_mm", 5.0)))
            hard_rows += [(n, *v) for v in cents[fp]]
            hit_rows += [(n, *v) for v in cents[~fp]]
        hard = np.asarray(hard_rows, dtype=np.float64).reshape(-1, 4)
        hits = np.asarray(hit_rows, dtype=np.float64).reshape(-1, 4)
        np.savez(mined, hard=hard, hits=hits)
        say(f"mining: {len(hard)} CDetNet false positives, {len(hits)} hits "
            f"({time.perf_counter() - t_mine:.0f} s)")
    sampler.hard = [(int(r[0]), r[1:]) for r in hard]
    sampler.hits = [(int(r[0]), r[1:]) for r in hits]
    val_cands = [_components(cdet, sc, thr, True, boundary_vox) for sc in val_scans]
    say(f"CDetNet on the validation scans (after clean-up): "
        f"{np.mean([len(c) for c, _ in val_cands]):.1f} candidates per scan")

    def val_classifier(net: torch.nn.Module) -> tuple[float, dict]:
        tables = [_table(sc, c, classify_candidates(net, sc.image, c))
                  for sc, (c, _) in zip(val_scans, val_cands)]
        m = score_candidates([s.val for s in val_scans], tables)
        return (m["cpm"] if np.isfinite(m["cpm"]) else -1.0), m

    def draw_kw(cfg: dict) -> dict:
        return {"pos_fraction": float(cfg.get("pos_fraction", 0.5)),
                "jitter": float(cfg.get("jitter", 2.0)),
                "hard_fraction": float(cfg.get("hard_fraction", 0.75)),
                "hit_fraction": float(cfg.get("hit_fraction", 0.3))}

    # ---- teacher --------------------------------------------------------------------------
    teacher = TeacherNet(**config["teacher"])
    config["teacher"] = teacher.config
    init_from_cdet = bool(rec.get("init_from_cdet", False))
    if init_from_cdet and teacher.config["widths"] == cdet.config["widths"]:
        # the teacher is CDetNet's encoder-decoder plus a head: start from CDetNet's weights
        teacher.encoder.load_state_dict(cdet.encoder.state_dict())
        teacher.decoder.load_state_dict(cdet.decoder.state_dict())
    t_cfg = st["teacher_stage"]
    opt_t = adam(teacher, t_cfg)

    def step_teacher(_: int) -> float:
        x, t, w, y = sampler.batch(CLASSIFY_PATCH, int(t_cfg.get("batch", 16)),
                                   gain=float(t_cfg.get("weight_gain", 5.0)),
                                   **draw_kw(t_cfg))
        seg, cls = teacher(x)
        loss = seg_loss(seg, t, w) + F.cross_entropy(cls, y)
        opt_t.zero_grad(set_to_none=True)
        loss.backward()
        opt_t.step()
        return float(loss.detach())

    r_t = run_stage("teacher", teacher, opt_t, step_teacher,
                    val_fn=lambda: val_classifier(teacher), **stage_kw(t_cfg))

    # ---- student (knowledge distillation) -------------------------------------------------
    student = StudentNet(**config["student"])
    config["student"] = student.config
    if init_from_cdet and student.config["widths"] == cdet.config["widths"]:
        student.encoder.load_state_dict(cdet.encoder.state_dict())
    s_cfg = st["student_stage"]
    opt_s = adam(student, s_cfg)
    teacher.eval()

    def step_student(_: int) -> float:
        x, _t, _w, y = sampler.batch(CLASSIFY_PATCH, int(s_cfg.get("batch", 16)),
                                     **draw_kw(s_cfg))
        with torch.no_grad():
            _, t_logits = teacher(x)
        loss = kd_loss(student(x), t_logits, y, **config["kd"])
        opt_s.zero_grad(set_to_none=True)
        loss.backward()
        opt_s.step()
        return float(loss.detach())

    r_s = run_stage("student", student, opt_s, step_student,
                    val_fn=lambda: val_classifier(student), **stage_kw(s_cfg))

    final = {"student": val_classifier(student)[1], "teacher": val_classifier(teacher)[1]}
    say(f"on the validation scans: {json.dumps(final)}")
    meta = {
        "method": "sundaresan2023",
        "recipe": {k: v for k, v in rec.items() if not k.startswith("_")},
        "recipe_file": rec.get("_path"), "seed": seed,
        "datasets": {"train": tr_ref.record(), "val": va_ref.record()},
        "command": f"cmbbench train --method sundaresan2023 --recipe {name}",
        "stages": {r.name: {"steps": r.steps, "seconds": r.seconds, "best": r.best,
                            "curve": r.curve} for r in (r_cdet, r_t, r_s)},
        "mining": {"hard_negatives": len(sampler.hard), "hits": len(sampler.hits)},
        "val": final["student"], "val_teacher": final["teacher"],
        "training_seconds": round(time.perf_counter() - t_start, 1),
        "hardware": hardware(),
    }
    path = out / f"{name}.pt"
    save_bundle(path, {"cdet": cdet, "teacher": teacher, "student": student}, config, meta)
    say(f"checkpoint {path} (val CPM {final['student']['cpm']:.3f})")
    return path
