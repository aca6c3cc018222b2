"""Training and fine-tuning of "ours" from a recorded recipe (``cmbbench train --method ours``).

:func:`train` reads a recipe (``recipes/<name>.yaml`` or a YAML path), preprocesses the
training scans to the working grid once, trains on augmented CMB-centred patches, evaluates the
CPM (cmbbench scoring, rule ``cmbbench``) on the validation scans every ``val_every`` steps,
keeps the best-CPM model, and writes into ``out``:

- ``last.pt`` / ``last.json``: resumable state (model, optimiser, step, RNG states);
- ``log.jsonl``: one line per logged step (loss) and per validation (CPM, sensitivities);
- ``<recipe name>.pt`` + ``<recipe name>.json``: the best model and its record (recipe,
  sha256, datasets with versions and exact scan ids, training time, hardware, val CPM curve).

With ``init`` (a checkpoint) and ``dataset`` (a registry name or folder) it fine-tunes on that
dataset: scans whose ``split`` is ``val`` (or, without one, a seeded 20 % of the scans, at least
one) are held out for model selection, the others are trained on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import yaml

from ...errors import ConfigurationError, MissingInputError
from . import RECIPES_DIR, WEIGHTS_DIR
from .augment import augment_batch
from .calibration import calibrate
from .checkpoint import build_model, load_checkpoint, save_checkpoint
from .losses import combined_loss
from .sampling import PatchSampler
from .synthetic_cmbs import CMBBank
from .training_data import ValSet, load_cases, open_split, split_dataset

__all__ = ["hardware", "load_recipe", "package_path", "train"]

log = logging.getLogger(__name__)


def load_recipe(recipe: str | Path | dict) -> dict:
    if isinstance(recipe, dict):
        return dict(recipe)
    p = Path(recipe)
    if not p.is_file():
        p = RECIPES_DIR / f"{recipe}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in RECIPES_DIR.glob("*.yaml")))
        raise ConfigurationError(f"unknown training recipe {recipe!r}; available: {known}")
    try:
        rec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"invalid recipe YAML: {str(exc).splitlines()[0]}", p) from None
    if not isinstance(rec, dict) or "name" not in rec:
        raise ConfigurationError("a recipe is a mapping with at least a name", p)
    rec.setdefault("_path", str(p))
    return rec


class _BatchStream(torch.utils.data.IterableDataset):
    """Endless augmented training batches made by DataLoader worker processes.

    Worker ``w`` draws from its own :class:`.sampling.PatchSampler` and augmentation generator,
    both seeded from ``(seed, start_step, w)``; a DataLoader takes the workers' batches in
    turn, so the stream depends only on the seed, the worker count and the step it starts at
    (a resumed run starts a fresh stream at its step)."""

    def __init__(self, make_sampler: Callable[[int], PatchSampler], batch: int, patch: int,
                 aug_cfg: dict, seed: int, start_step: int) -> None:
        super().__init__()
        self.make_sampler, self.batch, self.patch = make_sampler, batch, patch
        self.aug_cfg = {k: float(v) for k, v in aug_cfg.items()}
        self.seed, self.start_step = int(seed), int(start_step)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        torch.set_num_threads(1)
        s = np.random.SeedSequence([self.seed, self.start_step, wid]).generate_state(2)
        sampler = self.make_sampler(int(s[0]))
        g = torch.Generator().manual_seed(int(s[1]))
        while True:
            xb, yb = sampler.batch(self.batch)
            yield augment_batch(torch.from_numpy(xb), torch.from_numpy(yb), self.patch, g,
                                **self.aug_cfg)


def _resolve_device(name: str | None) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``."""
    name = str(name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigurationError(f"unknown device {name!r}: use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def package_path(path: str | Path | None, folder: Path) -> str | None:
    """A shipped file (a recipe or checkpoint inside ``folder`` of this package) as its path
    inside the repository/package; any other path as given; None stays None."""
    if not path:
        return None
    try:
        rel = Path(path).resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(path)
    return f"cmbbench/methods/ours/{folder.name}/{rel}"


def hardware() -> dict:
    return {"machine": platform.machine(), "processor": platform.processor() or "",
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def train(recipe: str | Path | dict, *, out: str | Path | None = None,
          init: str | Path | None = None, dataset: str | Path | None = None,
          steps: int | None = None, max_minutes: float | None = None, resume: bool = True,
          device: str | None = None, calibrate_after: bool = True, calibrate_only: bool = False,
          progress: Callable[[str], None] | None = None) -> Path:
    """Train (or fine-tune) from a recipe; returns the path of the best checkpoint.

    Parameters
    ----------
    recipe
        Recipe name (``recipes/<name>.yaml``), YAML path, or a mapping.
    out
        Output folder (default ``runs/train/<recipe name>``, or ``..-finetune`` with ``init``).
    init
        Checkpoint to start from (sha256-checked); its architecture replaces the recipe's.
        Default: the recipe's ``init`` (a path, or a file name in the package's weights
        folder), else random initialisation.
    dataset
        Fine-tune on this dataset (name or folder) with a held-out split instead of the
        recipe's ``train``/``val``.
    steps, max_minutes
        Override the recipe's step count and wall-clock budget.
    resume
        Continue from ``out/last.pt`` when it exists.
    device
        ``auto`` (CUDA when torch sees one, else CPU), ``cpu`` or ``cuda``; default: the
        recipe's ``device``, else ``auto``. The device used is recorded under ``hardware``.
    calibrate_after
        Run the recipe's ``calibrate`` step once training has finished (False: leave it to a
        later run with the same ``out``, e.g. on another machine).
    calibrate_only
        Train no further: (re)calibrate the best checkpoint of the run in ``out`` (one trained
        elsewhere with ``calibrate_after=False``, or cut short by its machine's time limit).

    Notes
    -----
    A recipe's ``loader_workers`` (default 0: batches made in this process) sets how many
    DataLoader processes make the augmented batches (:class:`_BatchStream`); a GPU needs
    several to be kept busy. The batch stream depends on that number, so it is part of the
    recipe.
    """
    say = progress or (lambda m: log.info(m))
    rec = load_recipe(recipe)
    if str(rec.get("stage", "unet")) == "classifier":
        # second stage: the U-Net of ``init`` stays as it is (steps, device and calibration
        # flags do not apply; a re-run reuses its per-scan candidate cache)
        from .train_classifier import train_classifier

        return train_classifier(rec, out=out, init=init, dataset=dataset, progress=say)
    finetune = init is not None
    if init is None and rec.get("init"):
        # a recipe that continues a shipped checkpoint names it (a bare file name: the
        # package's weights folder)
        init = Path(str(rec["init"]))
        if not init.is_absolute() and not init.is_file():
            init = WEIGHTS_DIR / init
    steps_arg, minutes_arg = steps, max_minutes
    seed = int(rec.get("seed", 0))
    steps = int(steps if steps is not None else rec.get("steps", 1000))
    budget_s = 60.0 * float(max_minutes if max_minutes is not None else
                            rec.get("max_minutes", 1e9))
    work_mm = float(rec.get("work_mm", 1.0))
    patch = int(rec.get("patch", 48))
    batch = int(rec.get("batch", 2))
    val_every = int(rec.get("val_every", 100))
    val_every_s = 60.0 * float(rec.get("val_every_minutes", 1e9))
    infer_cfg = dict(rec.get("infer") or {})
    loss_cfg = dict(rec.get("loss") or {})
    aug_cfg = dict(rec.get("augment") or {})
    name = str(rec["name"])
    out = Path(out) if out else Path("runs") / "train" / (name + ("-finetune" if finetune else ""))
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    torch.set_flush_denormal(True)  # denormal gradients make CPU convolutions erratically slow
    if init is not None:
        model, init_meta = load_checkpoint(init)
        model_cfg = {"channels": list(model.channels),
                     "deep_supervision": bool(rec.get("model", {}).get("deep_supervision",
                                                                       model.deep_supervision))}
        model.deep_supervision = model_cfg["deep_supervision"]
        work_mm = float(init_meta.get("recipe", {}).get("work_mm", work_mm))
    else:
        model_cfg = dict(rec.get("model") or {})
        model = build_model(model_cfg)
        init_meta = None
    dev = _resolve_device(device if device is not None else rec.get("device"))
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last_3d)  # faster oneDNN 3D convolutions
    else:
        model = model.to(dev)
        torch.backends.cudnn.benchmark = True
    loader_workers = int(rec.get("loader_workers", 0))
    say(("calibrating" if calibrate_only else "training") + f" on {dev.type}"
        + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
        + (f", {loader_workers} batch worker(s)" if loader_workers and not calibrate_only
           else ""))
    if patch % model.divisor:
        raise ConfigurationError(f"patch {patch} is not a multiple of {model.divisor}")

    if dataset is not None:
        tr_ref, va_ref = split_dataset(dataset, seed, rec.get("train", {}).get("max_scans"))
    else:
        tr_ref, va_ref = open_split(rec["train"]), open_split(rec["val"])
    t_load = time.perf_counter()
    samp_cfg = dict(rec.get("sampling") or {})
    crop = int(math.ceil(1.3 * patch))
    last = out / "last.pt"
    st = torch.load(last, map_location="cpu", weights_only=True) if (
        resume and last.is_file()) else None
    # a finished run re-run (e.g. to calibrate) needs no training data
    finished = st is not None and (int(st["step"]) >= steps or float(st["elapsed"]) >= budget_s)
    if calibrate_only:
        if st is None or not (out / f"{name}.pt").is_file():
            raise MissingInputError(f"nothing to calibrate: no {name} run (last.pt and "
                                    f"{name}.pt) in this folder", out)
        if not rec.get("calibrate"):
            raise ConfigurationError(f"recipe {name} has no calibrate step")
        finished = True
    cases = [] if finished else load_cases(
        tr_ref, work_mm, say, margin=crop // 4,
        hard=samp_cfg if float(samp_cfg.get("hard_fraction", 0)) > 0 else None, seed=seed)
    val = None if calibrate_only else ValSet(va_ref, work_mm)
    if val is not None:
        say(f"preprocessed {len(cases)} train + {len(val.items)} val scan(s) in "
            f"{time.perf_counter() - t_load:.0f} s")

    opt = torch.optim.Adam(model.parameters(), lr=float(rec.get("lr", 1e-3)),
                           weight_decay=float(rec.get("weight_decay", 0.0)))
    synth_cfg = dict(rec.get("synthetic_cmbs") or {})
    bank = None
    if not finished and float(synth_cfg.get("fraction", 0.0)) > 0:
        bank = CMBBank(int(synth_cfg.get("per_protocol", 100)), seed=seed,
                       median_mm=float(synth_cfg.get("median_mm", 2.7)),
                       log_sd=float(synth_cfg.get("log_sd", 0.5)),
                       range_mm=tuple(float(v) for v in synth_cfg.get("range_mm", (1.5, 10.0))),
                       uniform_share=float(synth_cfg.get("uniform_share", 0.3)))
        say(f"rendered {len(bank)} synthetic CMBs in {bank.seconds:.0f} s")

    def make_sampler(sampler_seed: int) -> PatchSampler:
        return PatchSampler(
            cases, crop, pos_fraction=float(samp_cfg.get("pos_fraction", 0.67)),
            hard_fraction=float(samp_cfg.get("hard_fraction", 0.0)), seed=sampler_seed,
            bank=bank, synth_fraction=float(synth_cfg.get("fraction", 0.0)),
            synth_max=int(synth_cfg.get("max_per_crop", 2)),
            synth_margin=int(synth_cfg.get("margin_vox", 10)))

    # in-process batches (loader_workers 0): one sampler whose state is checkpointed
    sampler = None if finished or loader_workers else make_sampler(seed)
    g = torch.Generator().manual_seed(seed)
    step, best, curve, elapsed0 = 0, -1.0, [], 0.0
    sampler_state = None
    if st is not None:
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        step, best, elapsed0 = int(st["step"]), float(st["best"]), float(st["elapsed"])
        g.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        extra = json.loads((out / "last.json").read_text())
        sampler_state = extra["sampler_rng"]
        if sampler is not None:
            sampler.rng.bit_generator.state = sampler_state
        curve = extra["curve"]
        say(f"resumed from {last} at step {step} (best val CPM {best:.3f})")
    logf = open(out / "log.jsonl", "a")
    t0 = time.perf_counter() - elapsed0
    record_base = {
        "recipe": {k: v for k, v in rec.items() if not k.startswith("_")},
        "recipe_file": package_path(rec.get("_path"), RECIPES_DIR), "seed": seed,
        "init": None if init is None else {
            "path": package_path(init, WEIGHTS_DIR), "sha256": (init_meta or {}).get("sha256")},
        "datasets": {"train": tr_ref.record(), "val": va_ref.record()},
        "command": ("cmbbench train --method ours --recipe " + name +
                    (f" --init {init}" if finetune else "") +
                    (f" --dataset {dataset}" if dataset else "") +
                    (f" --steps {steps_arg}" if steps_arg is not None else "") +
                    (f" --max-minutes {minutes_arg:g}" if minutes_arg is not None else "") +
                    (f" --device {device}" if device is not None else "") +
                    ("" if calibrate_after else " --no-calibrate") +
                    (" --calibrate-only" if calibrate_only else "")),
    }
    record_base["recipe"]["work_mm"] = work_mm

    def checkpoint_state() -> None:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "best": best, "elapsed": time.perf_counter() - t0, "gen": g.get_state(),
                    "torch_rng": torch.get_rng_state()}, out / "last.pt.partial")
        os.replace(out / "last.pt.partial", last)
        (out / "last.json").write_text(json.dumps(
            {"sampler_rng": sampler.rng.bit_generator.state if sampler is not None
             else sampler_state, "curve": curve}, default=int))

    last_val = [time.perf_counter()]

    def validate() -> None:
        nonlocal best
        tv = time.perf_counter()
        both = val.score_both(model, infer_cfg)
        m = {**both["with"], "without_postprocessing": both["without"]}
        model.train()
        entry = {"step": step, "elapsed_s": round(time.perf_counter() - t0, 1), **m,
                 "val_seconds": round(time.perf_counter() - tv, 1)}
        curve.append(entry)
        logf.write(json.dumps({"kind": "val", **entry}) + "\n")
        logf.flush()
        last_val[0] = time.perf_counter()
        # model selection on the better of the two post-processing variants: calibration
        # chooses the variant afterwards, so either may be the one shipped
        variants = [m["cpm"], m["without_postprocessing"]["cpm"]]
        cpm = max((c for c in variants if np.isfinite(c)), default=-1.0)
        say(f"step {step}: val CPM {m['cpm']:.3f} (without rules "
            f"{m['without_postprocessing']['cpm']:.3f}) recall {m['recall_pooled']:.3f} "
            f"FP/scan {m['fp_per_scan']:.2f} ({entry['val_seconds']:.0f} s)")
        if cpm > best or not (out / f"{name}.pt").is_file():
            best = max(best, cpm)
            save_checkpoint(model, out / f"{name}.pt", {
                **record_base, "step": step, "val": m, "val_curve": curve,
                "training_seconds": round(time.perf_counter() - t0, 1),
                "hardware": hardware()})

    batches = None
    if loader_workers and not finished:
        batches = iter(torch.utils.data.DataLoader(
            _BatchStream(make_sampler, batch, patch, aug_cfg, seed, step), batch_size=None,
            num_workers=loader_workers, prefetch_factor=4, pin_memory=dev.type == "cuda"))
    model.train()
    running, n_run = 0.0, 0
    lr0 = float(rec.get("lr", 1e-3))
    poly = str(rec.get("lr_schedule", "constant")) == "poly"
    while not calibrate_only and step < steps and time.perf_counter() - t0 < budget_s:
        if poly:  # lr0 (1 - progress)^0.9, progress by steps or by the wall-clock budget
            frac = max(step / steps, (time.perf_counter() - t0) / budget_s)
            for grp in opt.param_groups:
                grp["lr"] = lr0 * max(1.0 - frac, 0.02) ** 0.9
        if batches is not None:
            xb, yb = next(batches)
        else:
            xb, yb = sampler.batch(batch)
            xb, yb = augment_batch(torch.from_numpy(xb), torch.from_numpy(yb), patch, g,
                                   **{k: float(v) for k, v in aug_cfg.items()})
        if dev.type == "cpu":
            xb = xb.contiguous(memory_format=torch.channels_last_3d)
        else:
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
        loss = combined_loss(model(xb), yb, ce_weights=tuple(loss_cfg.get("ce_weights",
                                                                          (0.1, 5.0))),
                             alpha=float(loss_cfg.get("alpha", 0.5)),
                             beta=float(loss_cfg.get("beta", 0.5)),
                             gamma=float(loss_cfg.get("gamma", 4 / 3)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running += float(loss.detach())
        n_run += 1
        if step % 10 == 0 or step == steps:
            logf.write(json.dumps({"kind": "train", "step": step, "loss": running / n_run,
                                   "elapsed_s": round(time.perf_counter() - t0, 1)}) + "\n")
            logf.flush()
            if step % 50 == 0:
                say(f"step {step}: loss {running / n_run:.4f} "
                    f"({time.perf_counter() - t0:.0f} s)")
            running, n_run = 0.0, 0
        if step % val_every == 0 or time.perf_counter() - last_val[0] > val_every_s:
            validate()
            checkpoint_state()
    del batches  # stops the batch workers
    if not calibrate_only and (not curve or curve[-1]["step"] != step):
        validate()
        checkpoint_state()
    logf.close()
    train_seconds = time.perf_counter() - t0  # a finished run re-run: the recorded time
    best_path = out / f"{name}.pt"
    meta = json.loads(best_path.with_suffix(".json").read_text())
    cal = rec.get("calibrate")
    if cal and (calibrate_only or ("operating" not in meta and calibrate_after)):
        cal_ref = open_split(cal) if dataset is None else va_ref
        say(f"calibrating the operating point on {len(cal_ref.items)} {cal_ref.name} scan(s)")
        best_model, _ = load_checkpoint(best_path)
        best_model = best_model.to(dev)
        meta["operating"] = calibrate(best_model, ValSet(cal_ref, work_mm), infer_cfg,
                                      surfaces=tuple(float(x) for x in
                                                     cal.get("surfaces_mm", (2.0, 0.0))),
                                      progress=say)
        meta.setdefault("recipe", {})["calibrate"] = cal
    meta["val_curve"] = curve
    meta["last_command"] = record_base["command"]
    meta["total_training_seconds"] = round(train_seconds, 1)
    if cal and "seconds" in meta.get("operating", {}):
        meta["calibration_seconds"] = meta["operating"]["seconds"]
    meta["total_steps"] = step
    if sampler is not None and sampler.bank is not None:
        meta["synthetic_cmbs_inserted"] = sampler.n_synthetic  # this session's, if resumed
    # the record may change, the weights not: rewrite the JSON only (sha256 unchanged)
    best_path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    say(f"best val CPM {best:.3f}; checkpoint {best_path}")
    return best_path
