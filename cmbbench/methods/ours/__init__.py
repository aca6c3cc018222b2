"""The reference method "ours": a sequence-agnostic 3D U-Net trained in cmbbench, with
location-based post-processing (see :mod:`.plugin`). Importing this package needs torch."""

__all__ = ["DEFAULT_CHECKPOINT", "RECIPES_DIR", "WEIGHTS_DIR"]

from pathlib import Path

WEIGHTS_DIR = Path(__file__).with_name("weights")
RECIPES_DIR = Path(__file__).with_name("recipes")
DEFAULT_CHECKPOINT = WEIGHTS_DIR / "ours-synth-v8.pt"
