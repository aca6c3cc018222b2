"""The dataset registry: one YAML card per dataset in ``datasets_registry/``.

The registry folder is found, in order, at ``$CMBBENCH_REGISTRY``, in the checkout
(``<repo>/datasets_registry``, for the source/editable install the README uses), or inside the
installed package (``cmbbench/datasets_registry``, where a wheel puts the same cards).
Datasets prepared or generated locally live under the data home, ``$CMBBENCH_HOME`` or
``~/.cache/cmbbench``, as ``datasets/<NAME>-v<version>/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .errors import ConfigurationError, MissingInputError, UnreadableInputError

__all__ = ["data_home", "dataset_cache_dir", "list_cards", "load_card", "not_prepared_message",
           "portable_path", "registry_dir", "resolve_dataset"]


def registry_dir() -> Path:
    """Folder holding the YAML dataset cards."""
    env = os.environ.get("CMBBENCH_REGISTRY")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise MissingInputError("CMBBENCH_REGISTRY is not a folder", path)
        return path
    package = Path(__file__).resolve().parent
    candidates = [package.parent / "datasets_registry", package / "datasets_registry"]
    for path in candidates:
        if path.is_dir():
            return path
    raise MissingInputError("dataset registry not found (set CMBBENCH_REGISTRY)", candidates[0])


def data_home() -> Path:
    """Root of locally generated/prepared data (``$CMBBENCH_HOME`` or ``~/.cache/cmbbench``)."""
    env = os.environ.get("CMBBENCH_HOME")
    return Path(env) if env else Path.home() / ".cache" / "cmbbench"


def portable_path(path: str | Path) -> str:
    """``path`` as a training record stores it: ``$CMBBENCH_HOME/<relative path>`` for data
    under :func:`data_home` (so shipped records name no machine's folders), else absolute."""
    p = Path(path).resolve()
    try:
        return "$CMBBENCH_HOME/" + p.relative_to(data_home().resolve()).as_posix()
    except ValueError:
        return str(p)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UnreadableInputError(f"invalid YAML{where}", path) from None
    if not isinstance(data, dict) or "name" not in data:
        raise UnreadableInputError("a dataset card must be a mapping with a 'name'", path)
    return data


def list_cards() -> list[dict]:
    """Every card of the registry, sorted by name; each has ``_path`` set to its file."""
    cards = []
    for path in sorted(registry_dir().glob("*.yaml")):
        card = _read_yaml(path)
        card["_path"] = str(path)
        cards.append(card)
    return sorted(cards, key=lambda c: str(c["name"]))


def load_card(name: str) -> dict:
    """The card named ``name`` (case-insensitive).

    Raises
    ------
    ConfigurationError
        No card has that name (the message lists the known names).
    """
    cards = list_cards()
    for card in cards:
        if str(card["name"]).lower() == name.lower():
            return card
    known = ", ".join(str(c["name"]) for c in cards)
    raise ConfigurationError(f"unknown dataset {name!r}; known datasets: {known}")


def dataset_cache_dir(card: dict) -> Path:
    """Where a registry dataset is stored locally: ``<data home>/datasets/<name>-v<version>``."""
    return data_home() / "datasets" / f"{card['name']}-v{card.get('version', '0')}"


def not_prepared_message(card: dict, target: Path) -> str:
    """One line saying how to obtain and prepare a real dataset that is not (fully) prepared
    in ``target``."""
    name = card["name"]
    prepare = f"`cmbbench datasets prepare {name} --source RAW_DIR`"
    if (Path(target) / ".shards").is_dir():
        return (f"dataset {name} is only half-prepared (an interrupted prepare): re-run "
                f"{prepare} with the same RAW_DIR to finish it")
    where = " ".join(str(card.get("obtain") or "").split()).rstrip(".")
    url = card.get("url")
    if url:
        obtain = f"get it from {url}" + (f" ({where})" if where else "")
    else:
        obtain = where or "get your copy of the raw data"
    return (f"dataset {name} is not prepared: {obtain}, then run {prepare}; details: "
            f"`cmbbench datasets info {name}`")


def resolve_dataset(ref: str | Path, *, generate: bool = True, workers: int | None = None,
                    quiet: bool = False) -> Path:
    """Folder of a harmonized dataset given a folder path or a registry name.

    A registry name of a synthetic dataset that is not yet in the data home is generated there
    first (with a progress report on stderr) when ``generate`` is true, by ``workers``
    processes (default: one per CPU core, at most 4).

    Raises
    ------
    ConfigurationError
        ``ref`` is neither an existing folder nor a known dataset name.
    MissingInputError
        A non-synthetic registry dataset has not been prepared yet.
    """
    path = Path(ref)
    if path.is_dir():
        return path
    if any(sep in str(ref) for sep in ("/", "\\")):
        raise MissingInputError("dataset folder not found", path)
    card = load_card(str(ref))
    target = dataset_cache_dir(card)
    if (target / "dataset.json").is_file() and (target / "scans.csv").is_file():
        return target
    if card.get("kind") != "synthetic":
        raise MissingInputError(not_prepared_message(card, target), target)
    if not generate:
        raise MissingInputError(f"dataset {card['name']} has not been generated yet", target)
    from .progress import ProgressReporter
    from .synth.make import make_dataset
    from .synth.recipe import recipe_from_card

    if workers is None:
        workers = max(1, min(os.cpu_count() or 1, 4))
    make_dataset(recipe_from_card(card), target, workers=workers, card=card,
                 progress=ProgressReporter(f"generating {card['name']}", quiet=quiet))
    return target
