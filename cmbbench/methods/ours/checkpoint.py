"""Checkpoints of "ours": a ``.pt`` file (U-Net state dict and config, optionally the
second-stage candidate classifier) with a JSON record beside it that holds its sha256.
Loading checks that sha256 first, then reads the weights with
``torch.load(..., weights_only=True)``; a tampered, truncated or foreign file is refused with
one line."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...dataset import sha256_file
from ...errors import ConfigurationError
from .classifier import FEATURES, CandidateClassifier
from .unet import UNet3D

__all__ = ["build_model", "load_checkpoint", "load_ours", "save_checkpoint", "verified_record"]


def build_model(model_cfg: dict) -> UNet3D:
    """An untrained U-Net of a checkpoint's ``model`` config (``channels``,
    ``deep_supervision``)."""
    return UNet3D(channels=tuple(model_cfg.get("channels", (8, 16, 32))),
                  deep_supervision=bool(model_cfg.get("deep_supervision", False)))


def save_checkpoint(model: UNet3D, path: Path, meta: dict, *,
                    classifier: CandidateClassifier | None = None) -> dict:
    """Write ``path`` (state dict + model config, and the second-stage ``classifier`` when
    given) and ``path.json`` (meta + sha256)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = {"channels": list(model.channels), "deep_supervision": model.deep_supervision}
    tmp = path.with_name(path.name + ".partial")
    state = {"state_dict": {k: v.detach().cpu().clone() for k, v in
                            model.state_dict().items()}, "model": cfg}
    if classifier is not None:
        state["classifier"] = {
            "state_dict": {k: v.detach().cpu().clone() for k, v in
                           classifier.state_dict().items()},
            "hidden": list(classifier.hidden), "members": classifier.members,
            "features": list(FEATURES)}
    torch.save(state, tmp)
    tmp.replace(path)
    meta = {**meta, "model": cfg, "file": path.name, "sha256": sha256_file(path),
            "size_bytes": path.stat().st_size}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return meta


def verified_record(path: Path) -> dict:
    """The JSON record beside checkpoint ``path`` once the file's sha256 matches the one it
    records (shared by every trainable plugin's loader).

    Raises
    ------
    ConfigurationError
        Missing checkpoint or JSON, unreadable JSON, or a sha256 mismatch.
    """
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise ConfigurationError("checkpoint not found", path)
    if not meta_path.is_file():
        raise ConfigurationError("checkpoint has no JSON record (with its sha256) beside it",
                                 meta_path)
    try:
        meta = json.loads(meta_path.read_text())
        expected = str(meta["sha256"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigurationError("checkpoint JSON record is unreadable or has no sha256",
                                 meta_path) from None
    actual = sha256_file(path)
    if actual != expected:
        raise ConfigurationError(f"checkpoint sha256 {actual[:12]}... differs from the recorded "
                                 f"{expected[:12]}...; refusing to load it", path)
    return meta


def load_checkpoint(path: str | Path) -> tuple[UNet3D, dict]:
    """Load a checkpoint's U-Net after checking the sha256 recorded in the JSON beside it.

    Raises
    ------
    ConfigurationError
        Missing checkpoint or JSON, a sha256 mismatch (tampered or truncated file), or weights
        that ``torch.load(..., weights_only=True)`` refuses or that do not fit the model.
    """
    model, _, meta = load_ours(path)
    return model, meta


def load_ours(path: str | Path) -> tuple[UNet3D, CandidateClassifier | None, dict]:
    """:func:`load_checkpoint` plus the second-stage candidate classifier stored in the same
    file (None when the checkpoint has none).

    Raises
    ------
    ConfigurationError
        As :func:`load_checkpoint`; also a classifier built on other features than this
        version's :data:`.classifier.FEATURES`.
    """
    path = Path(path)
    meta = verified_record(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(state.get("model") or meta.get("model") or {})
        model.load_state_dict(state["state_dict"])
        clf = None
        if state.get("classifier"):
            c = state["classifier"]
            if list(c["features"]) != list(FEATURES):
                raise ValueError("its classifier was trained on other features than this "
                                 "version computes")
            clf = CandidateClassifier(len(FEATURES), tuple(c["hidden"]),
                                      int(c.get("members", 1)))
            clf.load_state_dict(c["state_dict"])
            clf.eval()
    except Exception as exc:  # noqa: BLE001 - any unpickling/shape problem is one line
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigurationError(f"checkpoint cannot be loaded: {type(exc).__name__}: {msg}",
                                 path) from None
    model.eval()
    return model, clf, meta
