"""Shared machinery of the deep baselines (``dou2016``, ``sundaresan2023``): recipes,
sha256-checked checkpoint bundles, patch cropping, budgeted resumable training stages and
validation scoring with cmbbench's own matching.

The reference method "ours" has the same pieces for a single U-Net
(:mod:`cmbbench.methods.ours.train`, :mod:`cmbbench.methods.ours.plugin`); the baselines hold
several networks per checkpoint and train in stages, so this module generalises them:

- a **bundle** (:func:`save_bundle` / :func:`load_bundle`) is one ``.pt`` file holding the
  state dicts of several networks and their configuration (plain Python types and tensors
  only, so ``torch.load(..., weights_only=True)`` reads it), with a JSON record beside it
  (recipe, datasets with versions and scan ids, training time, hardware, validation curve and
  the file's sha256). Loading refuses a file whose sha256 differs from the record's.
- a **stage** (:func:`run_stage`) trains one network for at most ``steps`` steps or a
  wall-clock budget, validates every ``val_every_s`` seconds, keeps the best state, and writes a
  resumable ``<stage>_last.pt`` (model, optimiser, step, elapsed time, RNG states); a finished
  stage leaves ``<stage>_done.pt`` and is skipped on a re-run.

Torch is imported by this module: the plugin modules import it lazily.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from cmbbench.dataset import sha256_file
from cmbbench.errors import ConfigurationError
from cmbbench.methods.ours.checkpoint import verified_record

__all__ = [
    "RECIPES_DIR",
    "WEIGHTS_DIR",
    "PointSampler",
    "StageResult",
    "TrainScan",
    "ValScan",
    "augment_patch",
    "crop",
    "hardware",
    "labels_to_work",
    "lesion_frame",
    "load_bundle",
    "load_recipe",
    "load_scans",
    "load_state",
    "run_stage",
    "save_bundle",
    "score_candidates",
]

log = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).with_name("recipes")
WEIGHTS_DIR = Path(__file__).with_name("weights")


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------

def load_recipe(recipe: str | Path | dict, *, method: str) -> dict:
    """A training recipe: ``recipes/<name>.yaml`` of this package, a YAML path, or a mapping.

    Raises
    ------
    ConfigurationError
        Unknown name (the message lists the shipped recipes of ``method``), invalid YAML, a
        recipe without a ``name``, or a recipe written for another method.
    """
    if isinstance(recipe, dict):
        rec = dict(recipe)
    else:
        p = Path(recipe)
        if not p.is_file():
            p = RECIPES_DIR / f"{recipe}.yaml"
        if not p.is_file():
            known = ", ".join(sorted(q.stem for q in RECIPES_DIR.glob(f"{method}-*.yaml")))
            raise ConfigurationError(f"unknown training recipe {recipe!r} for {method}; "
                                     f"available: {known or 'none'}")
        try:
            rec = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"invalid recipe YAML: {str(exc).splitlines()[0]}",
                                     p) from None
        if not isinstance(rec, dict):
            raise ConfigurationError("a recipe is a mapping", p)
        rec.setdefault("_path", str(p))
    if "name" not in rec:
        raise ConfigurationError(f"recipe {recipe!r} has no name")
    if str(rec.get("method", method)) != method:
        raise ConfigurationError(f"recipe {rec['name']!r} is for method {rec['method']!r}, "
                                 f"not {method!r}")
    return rec


# ---------------------------------------------------------------------------------------------
# checkpoint bundles
# ---------------------------------------------------------------------------------------------

def save_bundle(path: str | Path, nets: dict[str, torch.nn.Module], config: dict,
                meta: dict) -> dict:
    """Write ``path`` (state dicts of ``nets`` + ``config``) and ``path.json`` (meta + sha256).

    ``config`` must hold plain Python types only (it is read back with ``weights_only=True``).
    Returns the JSON record.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"nets": {k: {n: v.detach().cpu().clone() for n, v in m.state_dict().items()}
                      for k, m in nets.items()},
             "config": json.loads(json.dumps(config))}
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    tmp.replace(path)
    record = {**meta, "config": state["config"], "file": path.name,
              "sha256": sha256_file(path), "size_bytes": path.stat().st_size}
    path.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def load_bundle(path: str | Path) -> tuple[dict, dict]:
    """Read a bundle after checking the sha256 recorded in the JSON beside it.

    Returns
    -------
    state, meta
        ``state["nets"][name]`` are state dicts, ``state["config"]`` the configuration;
        ``meta`` is the JSON record.

    Raises
    ------
    ConfigurationError
        Missing file or record, a sha256 mismatch (tampered or truncated file), or content that
        ``torch.load(..., weights_only=True)`` refuses (anything but tensors and plain types).
    """
    path = Path(path)
    meta = verified_record(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not isinstance(state.get("nets"), dict):
            raise TypeError("not a cmbbench baseline bundle (no 'nets')")
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is one line
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigurationError(f"checkpoint cannot be loaded: {type(exc).__name__}: {msg}",
                                 path) from None
    return state, meta


def load_state(net: torch.nn.Module, state_dict: dict, path: str | Path) -> torch.nn.Module:
    """``net.load_state_dict`` with a one-line :class:`ConfigurationError` on a mismatch."""
    try:
        net.load_state_dict(state_dict)
    except Exception as exc:  # noqa: BLE001
        raise ConfigurationError(f"checkpoint does not fit the network: "
                                 f"{str(exc).splitlines()[0]}", path) from None
    return net.eval()


def hardware() -> dict:
    """Where a training ran (recorded in the checkpoint JSON)."""
    return {"machine": platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.is_available()}


# ---------------------------------------------------------------------------------------------
# patches
# ---------------------------------------------------------------------------------------------

def crop(arr: np.ndarray, centre: Sequence[float], size: Sequence[int],
         fill: float = 0.0) -> np.ndarray:
    """Box of ``size`` voxels around ``centre`` (voxel coordinates, rounded) from the last three
    axes of ``arr``, padded with ``fill`` outside the array.

    The box starts at ``round(centre) - size // 2`` (for an even size the centre voxel is the
    one just after the middle). Leading axes (channels) are kept.
    """
    arr = np.asarray(arr)
    size = tuple(int(s) for s in size)
    spatial = arr.shape[-3:]
    lo = np.rint(np.asarray(centre, dtype=np.float64)).astype(np.int64) - np.array(size) // 2
    out = np.full(arr.shape[:-3] + size, fill, dtype=arr.dtype)
    src = tuple(slice(int(max(a, 0)), int(min(a + s, n))) for a, s, n in zip(lo, size, spatial))
    if any(s.stop <= s.start for s in src):
        return out
    dst = tuple(slice(int(s.start - a), int(s.stop - a)) for s, a in zip(src, lo))
    out[(Ellipsis,) + dst] = arr[(Ellipsis,) + src]
    return out


# ---------------------------------------------------------------------------------------------
# validation scoring
# ---------------------------------------------------------------------------------------------

def lesion_frame(lesions: pd.DataFrame, scan_id: str) -> pd.DataFrame:
    """A lesion table with every column cmbbench's matching needs (from a dataset or a shard)."""
    from cmbbench.model import LESION_COLUMNS

    lz = lesions.copy()
    if "scan_id" not in lz.columns:
        lz["scan_id"] = scan_id
    defaults = {"location": "unknown", "mask_source": "none", "n_voxels": 0}
    for col in LESION_COLUMNS:
        if col not in lz.columns:
            lz[col] = defaults.get(col, np.nan)
    lz["n_voxels"] = lz["n_voxels"].fillna(0).astype(np.int64)
    lz["lesion_id"] = lz["lesion_id"].astype(np.int64)
    return lz[list(LESION_COLUMNS) + [c for c in lz.columns if c not in LESION_COLUMNS]]


@dataclass
class ValScan:
    """What scoring one validation scan needs (native grid)."""

    scan_id: str
    lesions: pd.DataFrame
    shape: tuple[int, int, int]
    affine: np.ndarray
    labels: np.ndarray | None = None
    sequence: str = "unknown"


def score_candidates(scans: Sequence[ValScan], candidates: Sequence[pd.DataFrame], *,
                     keys: Sequence[str] = ("cpm", "recall_pooled", "precision_pooled",
                                            "f1_pooled", "fp_per_scan")) -> dict:
    """Aggregates of point candidates (native voxels ``i, j, k``, ``score``) under the default
    rule ``cmbbench`` (world distance <= 5 mm, one-to-one), as ``cmbbench score`` computes them.
    """
    from cmbbench.matching import MATCH_COLUMNS, get_rule
    from cmbbench.metrics import scan_table
    from cmbbench.scoring import ScoreResult, score_case

    rule = get_rule("cmbbench")
    tables, extras = [], []
    for sc, cand in zip(scans, candidates):
        pts = cand[["i", "j", "k", "score"]] if len(cand) else pd.DataFrame(
            {"i": [], "j": [], "k": [], "score": []})
        case = score_case(scan_id=sc.scan_id, lesions=sc.lesions, image_shape=sc.shape,
                          image_affine=sc.affine, rule=rule, ref_labels=sc.labels, points=pts)
        tables.append(case.table)
        extras.append({"scan_id": sc.scan_id, "sequence": sc.sequence, **case.extras})
    ne = [t for t in tables if len(t)]
    table = pd.concat(ne, ignore_index=True) if ne else pd.DataFrame(columns=MATCH_COLUMNS)
    ids = [s.scan_id for s in scans]
    res = ScoreResult.from_tables(table, scan_table(table, ids, extra=pd.DataFrame(extras)),
                                  rule, n_boot=0)
    return {k: float(res.aggregates.get(k, float("nan"))) for k in keys}


# ---------------------------------------------------------------------------------------------
# budgeted, resumable training stages
# ---------------------------------------------------------------------------------------------

@dataclass
class StageResult:
    """Outcome of one training stage."""

    name: str
    steps: int
    seconds: float
    best: float
    curve: list = field(default_factory=list)


def run_stage(name: str, model: torch.nn.Module, opt: torch.optim.Optimizer,
              step_fn: Callable[[int], float], *, out: Path, steps: int, budget_s: float,
              val_fn: Callable[[], tuple[float, dict]], val_every_s: float,
              rng: np.random.Generator, torch_gen: torch.Generator | None = None,
              resume: bool = True, say: Callable[[str], None] = log.info,
              log_every: int = 50) -> StageResult:
    """Train ``model`` with ``step_fn`` and keep the state with the best validation score.

    Parameters
    ----------
    name
        Stage name (file prefix in ``out``).
    model, opt
        The network and its optimiser (``step_fn`` uses them).
    step_fn
        ``step_fn(step) -> loss``: one optimisation step (draws from ``rng``/``torch_gen``).
    out
        Folder of ``<name>_last.pt`` / ``<name>_last.json`` (resumable state),
        ``<name>_done.pt`` (best state when the stage finished) and ``log.jsonl``.
    steps, budget_s
        Step count and wall-clock budget (s); the stage ends at whichever comes first.
    val_fn
        ``val_fn() -> (score, metrics)``, higher is better; called every ``val_every_s``
        seconds of training and at the end.
    rng, torch_gen
        Random generators whose states are saved with the resumable state.
    resume
        Continue from ``<name>_last.pt`` when it exists; a finished stage is not re-run.

    Returns
    -------
    StageResult
        The model holds the best state on return.
    """
    out.mkdir(parents=True, exist_ok=True)
    done, last, last_json = out / f"{name}_done.pt", out / f"{name}_last.pt", \
        out / f"{name}_last.json"
    if resume and done.is_file():
        st = torch.load(done, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        info = json.loads(done.with_suffix(".json").read_text())
        say(f"{name}: finished earlier (best {info['best']:.4f}), not re-run")
        return StageResult(name, int(info["steps"]), float(info["seconds"]),
                           float(info["best"]), info["curve"])
    step, best, elapsed0, curve = 0, -float("inf"), 0.0, []
    best_state = None
    if resume and last.is_file():
        st = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        best_state = st["best_model"]
        step, elapsed0 = int(st["step"]), float(st["elapsed"])
        torch.set_rng_state(st["torch_rng"])
        if torch_gen is not None:
            torch_gen.set_state(st["torch_gen"])
        extra = json.loads(last_json.read_text())
        rng.bit_generator.state = extra["rng"]
        best, curve = float(extra["best"]), extra["curve"]
        say(f"{name}: resumed at step {step} ({elapsed0:.0f} s done, best {best:.4f})")
    logf = open(out / "log.jsonl", "a")  # noqa: SIM115 - closed at the end of the stage
    t0 = time.perf_counter() - elapsed0
    last_val = time.perf_counter()

    def snapshot() -> None:
        st = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
              "elapsed": time.perf_counter() - t0, "torch_rng": torch.get_rng_state(),
              "best_model": best_state if best_state is not None else model.state_dict()}
        if torch_gen is not None:
            st["torch_gen"] = torch_gen.get_state()
        torch.save(st, last.with_name(last.name + ".partial"))
        os.replace(last.with_name(last.name + ".partial"), last)
        last_json.write_text(json.dumps({"rng": rng.bit_generator.state, "best": best,
                                         "curve": curve}, default=int))

    def validate() -> None:
        nonlocal best, best_state, last_val
        tv = time.perf_counter()
        score, metrics = val_fn()
        model.train()
        entry = {"stage": name, "step": step, "elapsed_s": round(time.perf_counter() - t0, 1),
                 "score": score, **metrics, "val_seconds": round(time.perf_counter() - tv, 1)}
        curve.append(entry)
        logf.write(json.dumps({"kind": "val", **entry}) + "\n")
        logf.flush()
        say(f"{name} step {step}: val score {score:.4f} {json.dumps(metrics)} "
            f"({entry['val_seconds']:.0f} s)")
        if np.isfinite(score) and score > best or best_state is None:
            best = score if np.isfinite(score) else best
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        last_val = time.perf_counter()

    model.train()
    running, n_run = 0.0, 0
    while step < steps and time.perf_counter() - t0 < budget_s:
        loss = float(step_fn(step))
        step += 1
        running += loss
        n_run += 1
        if step % log_every == 0:
            logf.write(json.dumps({"kind": "train", "stage": name, "step": step,
                                   "loss": running / n_run,
                                   "elapsed_s": round(time.perf_counter() - t0, 1)}) + "\n")
            logf.flush()
            say(f"{name} step {step}: loss {running / n_run:.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
            running, n_run = 0.0, 0
        if time.perf_counter() - last_val > val_every_s:
            validate()
            snapshot()
    if not curve or curve[-1]["step"] != step:
        validate()
    seconds = round(time.perf_counter() - t0, 1)
    model.load_state_dict(best_state)
    model.eval()
    torch.save({"model": best_state}, done)
    done.with_suffix(".json").write_text(json.dumps(
        {"steps": step, "seconds": seconds, "best": best, "curve": curve}, default=float))
    logf.close()
    say(f"{name}: {step} steps in {seconds:.0f} s, best val score {best:.4f}")
    return StageResult(name, step, seconds, best, curve)


# ---------------------------------------------------------------------------------------------
# training scans
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainScan:
    """One scan prepared for training, on its working grid.

    Attributes
    ----------
    scan_id
        Identifier.
    grid
        Its :class:`~cmbbench_baselines.grid.WorkGrid`.
    image
        Prepared input, ``[i, j, k]`` or ``[c, i, j, k]`` (float32).
    mask
        Boolean foreground mask ``[i, j, k]``.
    centres
        ``(M, 3)`` reference CMB centres in working-grid voxels (float).
    labels
        Working-grid instance labels (int16) or None when not asked for.
    val
        What scoring the scan on its native grid needs.
    pool
        ``(P, 3)`` foreground voxels (subsampled) for random negative patches.
    """

    scan_id: str
    grid: object
    image: np.ndarray
    mask: np.ndarray
    centres: np.ndarray
    labels: np.ndarray | None
    val: ValScan
    pool: np.ndarray


class PointSampler:
    """Where the next training patch of the deep baselines goes, and its class.

    A patch is positive with probability ``pos_fraction`` (when the scans hold any CMB): centred
    on a stage-1 hit (``hits``, with probability ``hit_fraction`` once there are any) or on a
    reference CMB centre jittered by up to ``jitter`` voxels in-plane and ``jitter / 2``
    through-plane. Otherwise it is negative: on a mined hard negative (``hard``, with
    probability ``hard_fraction`` once there are any) or on a random voxel of a random scan's
    ``pool``. Centres are in working-grid voxels ``(i, j, k)``; ``hard`` and ``hits`` are
    ``(scan index, centre)`` pairs the training loop fills after mining.

    Parameters
    ----------
    scans
        The prepared training scans.
    rng
        The one generator of the sampler (its draws are the training run's stream).
    """

    def __init__(self, scans: list[TrainScan], rng: np.random.Generator) -> None:
        self.scans = scans
        self.rng = rng
        self.cmbs = [(n, c) for n, s in enumerate(scans) for c in s.centres]
        self.hard: list[tuple[int, np.ndarray]] = []
        self.hits: list[tuple[int, np.ndarray]] = []

    def point(self, *, pos_fraction: float, jitter: float, hard_fraction: float = 0.0,
              hit_fraction: float = 0.0) -> tuple[int, np.ndarray, int]:
        """Draw one patch position: ``(scan index, centre [voxels], label 1 | 0)``."""
        rng = self.rng
        if rng.random() < pos_fraction and self.cmbs:
            if self.hits and rng.random() < hit_fraction:
                s, c = self.hits[rng.integers(len(self.hits))]
            else:
                s, c = self.cmbs[rng.integers(len(self.cmbs))]
                c = c + rng.uniform(-jitter, jitter, 3) * np.array([1.0, 1.0, 0.5])
            return s, c, 1
        if self.hard and rng.random() < hard_fraction:
            s, c = self.hard[rng.integers(len(self.hard))]
        else:
            s = int(rng.integers(len(self.scans)))
            pool = self.scans[s].pool
            c = pool[rng.integers(len(pool))].astype(np.float64)
        return s, c, 0


def labels_to_work(grid: object, labels: np.ndarray) -> np.ndarray:
    """Native instance labels -> working grid (nearest neighbour), every instance kept: one
    that nearest-neighbour sampling loses is re-inserted as its centre-of-mass voxel."""
    lab = np.asarray(labels).astype(np.int32)
    out = grid.to_work(lab, order=0).astype(np.int32)
    ids = np.unique(lab[lab > 0])
    kept = set(np.unique(out[out > 0]).tolist())
    for i in ids:
        if int(i) in kept:
            continue
        com = grid.native_to_work(np.array(ndimage_com(lab == i)))[0]
        idx = tuple(int(np.clip(round(c), 0, s - 1)) for c, s in zip(com, out.shape))
        out[idx] = int(i)
    return out.astype(np.int16)


def ndimage_com(mask: np.ndarray) -> tuple[float, float, float]:
    """Centre of mass (voxels) of a boolean mask."""
    from scipy import ndimage

    return tuple(float(v) for v in ndimage.center_of_mass(mask))


def load_scans(ref: object, prepare: Callable[[np.ndarray, np.ndarray], tuple],
               *, want_labels: bool = False, for_scoring: bool = False,
               pool_size: int = 50_000, say: Callable[[str], None] = log.info
               ) -> list[TrainScan]:
    """Read and prepare the scans of a :class:`cmbbench.methods.ours.train.DataRef`.

    Parameters
    ----------
    ref
        ``ref.items`` are ``(scan_id, image path, label path, sequence, lesions)``.
    prepare
        ``prepare(image, spacing_mm) -> (WorkGrid, image, mask)`` (the method's own input
        preparation, identical to what its ``predict`` does).
    want_labels
        Also resample the instance label maps to the working grid.
    for_scoring
        Keep the native label maps (validation scans scored with cmbbench's matching); the
        default drops them to save memory.
    """
    from cmbbench.nifti import read_volume

    scans = []
    t0 = time.perf_counter()
    for sid, ip, lp, seq, lesions in ref.items:
        vol = read_volume(ip)
        grid, image, mask = prepare(np.asarray(vol.data), vol.spacing_mm)
        lz = lesion_frame(lesions, sid)
        native = lz[["i", "j", "k"]].to_numpy(np.float64) if len(lz) else np.zeros((0, 3))
        centres = grid.native_to_work(native) if len(native) else np.zeros((0, 3))
        labels_native = (np.asarray(read_volume(lp).data).astype(np.uint32)
                         if lp is not None and Path(lp).is_file() else None)
        labels = None
        if want_labels:
            labels = (labels_to_work(grid, labels_native) if labels_native is not None
                      else np.zeros(grid.work_shape, np.int16))
        pool = np.argwhere(mask)
        if len(pool) > pool_size:  # a copy, so that the full list is freed
            pool = pool[:: len(pool) // pool_size].copy()
        scans.append(TrainScan(sid, grid, image, mask, centres, labels,
                               ValScan(sid, lz, tuple(vol.data.shape[:3]), vol.affine,
                                       labels_native if for_scoring else None, str(seq)),
                               pool))
    say(f"prepared {len(scans)} scan(s) of {ref.name} in {time.perf_counter() - t0:.0f} s")
    return scans


def augment_patch(patch: np.ndarray, rng: np.random.Generator, *, rot90: bool = True,
                  flip_k: bool = False, intensity: float = 0.1,
                  noise: float = 0.1) -> np.ndarray:
    """Random flips of the in-plane axes (and of the slice axis with ``flip_k``), a random
    multiple of 90 degrees in-plane (square in-plane patches only), intensity scaling
    ``1 +- intensity``, shift ``+- intensity`` and Gaussian noise of sd up to ``noise`` (in
    normalised units). Works on ``[i, j, k]`` or ``[c, i, j, k]`` (intensity changes only on
    channel 0)."""
    x = np.asarray(patch)
    sp = x.ndim - 3  # first spatial axis
    for ax in (sp, sp + 1) + ((sp + 2,) if flip_k else ()):
        if rng.random() < 0.5:
            x = np.flip(x, axis=ax)
    if rot90 and x.shape[sp] == x.shape[sp + 1]:
        x = np.rot90(x, k=int(rng.integers(4)), axes=(sp, sp + 1))
    x = np.ascontiguousarray(x, dtype=np.float32)
    if intensity > 0 or noise > 0:
        ch = x[0] if sp else x
        a = 1.0 + rng.uniform(-intensity, intensity)
        b = rng.uniform(-intensity, intensity)
        ch *= np.float32(a)
        ch += np.float32(b)
        if noise > 0:
            ch += rng.normal(0.0, rng.uniform(0.0, noise), ch.shape).astype(np.float32)
    return x
