"""The ``cmbbench`` command line: a thin layer over the library.

Exit codes (also in ``docs/cli.md``): 0 success; 1 unexpected internal error; 2 usage error;
3 missing input; 4 unreadable input; 5 geometry mismatch; 6 invalid values; 7 configuration
error; 8 partial failure (some scans failed, the others finished); 70 internal consistency
check failed. Errors are one line on stderr
(``cmbbench: error: <file>: <problem>``), or a JSON object on stdout with ``--json``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import click

from . import __version__
from .errors import EXIT_CODES, CmbbenchError

log = logging.getLogger("cmbbench")


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # nibabel logs header problems through its own stderr handler (and ours): a corrupt header
    # would print several lines before cmbbench's one-line error that already reports it.
    logging.getLogger("nibabel").setLevel(logging.CRITICAL)


def _fail(exc: CmbbenchError, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"ok": False, "error": {
            "type": type(exc).__name__, "message": str(exc),
            "path": None if exc.path is None else str(exc.path), "exit_code": exc.exit_code}}))
    else:
        click.echo(f"cmbbench: error: {exc}", err=True)
    sys.exit(exc.exit_code)


def _fmt(v: float, digits: int = 3) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def summary_lines(result) -> list[str]:  # noqa: ANN001 - ScoreResult, imported lazily
    """A short human-readable summary of a :class:`cmbbench.scoring.ScoreResult`."""
    a = result.aggregates
    ci = result.ci

    def with_ci(key: str) -> str:
        s = _fmt(a[key])
        if ci is not None and key in ci.lower and not math.isnan(ci.lower[key]):
            s += f"  [{_fmt(ci.lower[key])}, {_fmt(ci.upper[key])}]"
        return s

    lines = [
        f"rule {result.rule.rule_id}: {result.rule.description}",
        f"scans {int(a['n_scans'])} ({int(a['n_scans_positive'])} with CMBs), reference CMBs "
        f"{int(a['n_ref'])}, predicted {int(a['n_pred'])} at threshold "
        f"{result.rule.operating_threshold:g}",
        f"TP {int(a['tp'])}  FP {int(a['fp'])}  FN {int(a['fn'])}  ignored {int(a['ignored'])}"
        + (f"  merged {int(a['merged'])}" if a["merged"] else ""),
        "",
        f"{'metric':<28}{'value':<10}{'95% CI (bootstrap over scans)' if ci else ''}",
        f"{'precision (pooled)':<28}{with_ci('precision_pooled')}",
        f"{'recall (pooled)':<28}{with_ci('recall_pooled')}",
        f"{'F1 (pooled)':<28}{with_ci('f1_pooled')}",
        f"{'FP per scan (all scans)':<28}{with_ci('fp_per_scan')}",
        f"{'FP per reference CMB':<28}{with_ci('fp_per_cmb')}",
        f"{'precision per scan':<28}{_fmt(a['precision_mean'])} ± {_fmt(a['precision_sd'])}"
        f"  (n={int(a['precision_n'])})",
        f"{'recall per scan':<28}{_fmt(a['recall_mean'])} ± {_fmt(a['recall_sd'])}"
        f"  (n={int(a['recall_n'])})",
        f"{'F1 per scan':<28}{_fmt(a['f1_mean'])} ± {_fmt(a['f1_sd'])}  (n={int(a['f1_n'])})",
        f"{'CPM (FROC 1/8..8 FP/scan)':<28}{with_ci('cpm')}",
        f"{'average precision':<28}{with_ci('average_precision')}",
        f"{'scan >=1 CMB sens/spec':<28}{_fmt(a['scan_ge1_sensitivity'])} / "
        f"{_fmt(a['scan_ge1_specificity'])}  AUROC {_fmt(a['scan_ge1_auroc'])}",
        f"{'count MAE':<28}{_fmt(a['count_mae'])}",
        f"{'Dice (matched pairs)':<28}{_fmt(a['dice_pairs_mean'])}",
    ]
    if result.missing:
        lines.append(f"scored as empty (no prediction): {', '.join(result.missing)}")
    return lines


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cmbbench")
def main() -> None:
    """cmbbench: benchmark cerebral microbleed (CMB) detection on brain MRI."""


@main.command()
@click.argument("pred_dir", type=click.Path(path_type=Path))
@click.option("--reference", "reference", required=True,
              help="Harmonized reference dataset: a folder, or a registry name (SYNTH-demo...).")
@click.option("--rule", default="cmbbench", show_default=True,
              help="Matching rule: cmbbench, delpozo2024, valdo2021, dou2016, wmh2017.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Results folder [default: results/<pred_dir name>/<rule>].")
@click.option("--missing", type=click.Choice(["error", "empty"]), default="error",
              show_default=True, help="A scan without prediction: fail, or score it as empty.")
@click.option("--threshold", type=float, default=None,
              help="Operating threshold on candidate scores [default: the rule's, 0.5].")
@click.option("--floor", type=float, default=None,
              help="Probability floor of candidate extraction [default: the rule's].")
@click.option("--n-boot", type=int, default=1000, show_default=True,
              help="Bootstrap replicates over scans for the CIs (0: none).")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap RNG seed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def score(pred_dir: Path, reference: str, rule: str, out: Path | None, missing: str,
          threshold: float | None, floor: float | None, n_boot: int, seed: int, as_json: bool,
          quiet: bool) -> None:
    """Score the predictions in PRED_DIR against a reference dataset.

    Writes matches.csv (one row per reference CMB and per candidate), scans.csv, aggregates
    (JSON + CSV), froc.csv and strata.csv, and prints a summary.
    """
    _setup_logging(quiet or as_json)
    from .registry import resolve_dataset
    from .scoring import score_folder

    try:
        result = score_folder(pred_dir, resolve_dataset(reference, quiet=quiet or as_json),
                              rule=rule, missing=missing,  # type: ignore[arg-type]
                              n_boot=n_boot, seed=seed,
                              rule_overrides={"operating_threshold": threshold,
                                              "candidate_floor": floor})
        out_dir = out or Path("results") / pred_dir.resolve().name / result.rule.name
        result.save(out_dir)
    except CmbbenchError as exc:
        _fail(exc, as_json)
        return
    if as_json:
        click.echo(json.dumps({"ok": True, "out": str(out_dir), **result.to_json_dict()}))
    else:
        for line in summary_lines(result):
            click.echo(line)
        click.echo(f"\nresults written to {out_dir}")


@main.group()
def rules() -> None:
    """Matching rules (named, versioned presets)."""


@rules.command("list")
def rules_list() -> None:
    """List the preset matching rules."""
    from .matching import list_rules

    for r in list_rules():
        click.echo(f"{r.rule_id:<16}{r.description}")


@rules.command("show")
@click.argument("name")
def rules_show(name: str) -> None:
    """Show every parameter of rule NAME as JSON."""
    from .matching import get_rule

    try:
        click.echo(json.dumps(get_rule(name).to_dict(), indent=2))
    except CmbbenchError as exc:
        _fail(exc, False)


@main.group()
def datasets() -> None:
    """Datasets: the registry, generation of the synthetic (SYNTH-*) datasets, and preparation
    of the public ones from the user's raw copy."""


@datasets.command("list")
def datasets_list() -> None:
    """List the datasets of the registry and whether each is available locally."""
    from .registry import dataset_cache_dir, list_cards

    try:
        cards = list_cards()
    except CmbbenchError as exc:
        _fail(exc, False)
        return
    for card in cards:
        local = dataset_cache_dir(card)
        state = "ready" if (local / "dataset.json").is_file() else (
            "generated on first use" if card.get("kind") == "synthetic" else "not prepared")
        click.echo(f"{card['name']:<14}v{card.get('version', '')!s:<5}"
                   f"{card.get('kind', 'real'):<10}{state:<24}{local}")


@datasets.command("make")
@click.argument("name")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: the data home, see `datasets list`].")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Processes generating scans in parallel.")
@click.option("--quiet", is_flag=True, help="No progress report.")
def datasets_make(name: str, out: Path | None, workers: int, quiet: bool) -> None:
    """Generate the synthetic dataset NAME (resumes an interrupted run)."""
    _setup_logging(True)
    from .progress import ProgressReporter
    from .registry import dataset_cache_dir, load_card
    from .synth.make import make_dataset
    from .synth.recipe import recipe_from_card

    try:
        card = load_card(name)
        recipe = recipe_from_card(card)
        target = out or dataset_cache_dir(card)
        ds = make_dataset(recipe, target, workers=workers, card=card,
                          progress=ProgressReporter(f"generating {recipe.name}", quiet=quiet))
    except CmbbenchError as exc:
        _fail(exc, False)
        return
    click.echo(f"{ds.name}: {len(ds.scan_ids)} scans, {len(ds.lesions)} CMBs, "
               f"{0 if ds.mimics is None else len(ds.mimics)} mimics in {ds.root}")


@datasets.command("info")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the card as one JSON object.")
def datasets_info(name: str, as_json: bool) -> None:
    """Show the card of dataset NAME, how to obtain it and the exact prepare command."""
    from .registry import dataset_cache_dir, load_card

    try:
        card = load_card(name)
    except CmbbenchError as exc:
        _fail(exc, as_json)
        return
    local = dataset_cache_dir(card)
    synthetic = card.get("kind") == "synthetic"
    command = (f"cmbbench datasets make {card['name']}" if synthetic
               else f"cmbbench datasets prepare {card['name']} --source RAW_DIR")
    state = "ready" if (local / "dataset.json").is_file() else (
        "half-prepared" if (local / ".shards").is_dir() else "not prepared")
    if as_json:
        click.echo(json.dumps({"ok": True, "card": {k: v for k, v in card.items()
                                                    if not k.startswith("_")},
                               "command": command, "local": str(local), "state": state},
                              default=str))
        return
    for key in ("name", "version", "kind", "citation", "url", "licence", "label_kind",
                "sequence", "field_strength_t", "voxel_mm", "counts", "split", "loader"):
        if key in card:
            click.echo(f"{key + ':':<18}{' '.join(str(card[key]).split())}")
    for line in card.get("raw_layout") or []:
        click.echo(f"{'raw layout:':<18}{line}")
    if card.get("unverified"):
        click.echo(f"{'unverified:':<18}{'; '.join(str(u) for u in card['unverified'])}")
    if card.get("obtain"):
        click.echo(f"{'how to obtain:':<18}{' '.join(str(card['obtain']).split())}")
    click.echo(f"{'local copy:':<18}{local} ({state})")
    click.echo(f"{'prepare with:':<18}{command}")


@datasets.command("prepare")
@click.argument("name")
@click.option("--source", type=click.Path(path_type=Path), required=True,
              help="Folder of your copy of the raw dataset (see `datasets info NAME`).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: the data home, see `datasets list`].")
@click.option("--no-location", is_flag=True,
              help="Skip the atlas registration: every MARS location is 'unknown'.")
@click.option("--quiet", is_flag=True, help="No progress report.")
def datasets_prepare(name: str, source: Path, out: Path | None, no_location: bool,
                     quiet: bool) -> None:
    """Harmonize the raw dataset NAME from --source (resumes an interrupted run); each
    lesion's MARS location comes from the bundled atlas registered to its scan."""
    _setup_logging(True)
    from .loaders import prepare
    from .progress import ProgressReporter
    from .registry import dataset_cache_dir, load_card

    try:
        card = load_card(name)
        target = out or dataset_cache_dir(card)
        ds = prepare(card, source, target,
                     progress=ProgressReporter(f"preparing {card['name']}", quiet=quiet),
                     locate=False if no_location else None)
    except CmbbenchError as exc:
        _fail(exc, False)
        return
    click.echo(f"{ds.name}: {len(ds.scan_ids)} scans, {len(ds.lesions)} CMBs in {ds.root}")


@datasets.command("verify")
@click.argument("name")
@click.option("--path", "path", type=click.Path(path_type=Path), default=None,
              help="Dataset folder [default: the data home copy of NAME].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def datasets_verify(name: str, path: Path | None, as_json: bool) -> None:
    """Check a prepared dataset: counts, checksums, affines, every lesion inside and dark."""
    _setup_logging(True)
    from .errors import InvalidValuesError
    from .loaders import verify_dataset
    from .registry import dataset_cache_dir, load_card

    try:
        card = load_card(name)
        report = verify_dataset(path or dataset_cache_dir(card), card)
    except CmbbenchError as exc:
        _fail(exc, as_json)
        return
    if as_json:
        click.echo(json.dumps({"ok": report.ok, **report.to_dict()}))
    else:
        for line in report.lines():
            click.echo(line)
    if not report.ok:
        if not as_json:
            click.echo(f"cmbbench: error: {report.root}: verification failed", err=True)
        sys.exit(InvalidValuesError.exit_code)


@datasets.command("stats")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as one JSON object.")
def datasets_stats(name: str, as_json: bool) -> None:
    """Statistics page of dataset NAME (registry name or folder; prepared or generated):
    counts, CMBs per scan, sizes, MARS locations, registration quality, voxel sizes."""
    _setup_logging(True)
    from .dataset import read_dataset
    from .loaders import dataset_statistics, statistics_markdown
    from .registry import resolve_dataset

    try:
        stats = dataset_statistics(read_dataset(resolve_dataset(name, generate=False)))
    except CmbbenchError as exc:
        _fail(exc, as_json)
        return
    click.echo(json.dumps(stats, default=str) if as_json else statistics_markdown(stats))


@main.command("make-example")
@click.argument("out_dir", type=click.Path(path_type=Path))
def make_example_cmd(out_dir: Path) -> None:
    """Write a small scoring example: OUT_DIR/reference and OUT_DIR/predictions."""
    from .examples import make_example

    ds, pred = make_example(out_dir)
    click.echo(f"reference dataset: {ds.root} ({len(ds.scan_ids)} scans, {len(ds.lesions)} CMBs)")
    click.echo(f"predictions:       {pred}")
    click.echo(f"next: cmbbench score {pred} --reference {ds.root}")


# ---------------------------------------------------------------------------------------------
# methods, predict, evaluate, merge (thin: every command is one call into cmbbench.evaluation)


@main.group()
def methods() -> None:
    """Detection methods installed as plugins (the cmbbench.methods entry-point group)."""


@methods.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def methods_list(as_json: bool) -> None:
    """List the installed methods (name, version, citation, providing package)."""
    from .methods.registry import describe_methods

    rows = describe_methods()
    if as_json:
        click.echo(json.dumps({"ok": True, "methods": rows}))
        return
    if not rows:
        click.echo("no methods installed (see docs/plugins.md to add one)")
    for r in rows:
        dist = r["distribution"]
        by = f"{dist.get('name')} {dist.get('version')}" if dist else r["entry_point"]
        if r["error"]:
            click.echo(f"{r['name']:<16}{'-':<10}{r['error']}")
        else:
            cite = (r["citation"] or "").replace("\n", " ")
            cite = cite if len(cite) <= 60 else cite[:57] + "..."
            click.echo(f"{r['name']:<16}{r['version']!s:<10}{cite:<62}{by}")


@methods.command("info")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def methods_info(name: str, as_json: bool) -> None:
    """Show everything about method NAME: version, citation, description, limitations,
    requirements, entry point."""
    from .methods.registry import method_info

    try:
        info = method_info(name)
    except CmbbenchError as exc:
        _fail(exc, as_json)
        return
    if as_json:
        click.echo(json.dumps({"ok": True, **info}))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        click.echo(f"{key + ':':<16}{value if value not in ('', None) else '-'}")


def _parse_params(items: tuple[str, ...]) -> dict:
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--param")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _run_options(fn):  # noqa: ANN001, ANN202 - click decorator stack
    opts = [
        click.option("--method", "method", required=True,
                     help="Installed method (see `cmbbench methods list`)."),
        click.option("--dataset", "dataset", required=True,
                     help="Dataset name from the registry (e.g. SYNTH-demo) or a harmonized "
                          "dataset folder."),
        click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
                     help="Method parameter (VALUE read as JSON, else as a string); repeatable."),
        click.option("--backend", type=click.Choice(["serial", "local", "dask"]),
                     default="serial", show_default=True, help="Executor."),
        click.option("--workers", type=int, default=None,
                     help="Worker processes (local: default the CPU count; dask: LocalCluster "
                          "size)."),
        click.option("--scheduler", default=None, metavar="ADDRESS",
                     help="Dask scheduler address (dask backend; default: a LocalCluster)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Run seed (each scan gets a seed derived from it and its id)."),
        click.option("--part-id", type=int, default=0, show_default=True,
                     help="Run only this part (0-based) of --num-parts."),
        click.option("--num-parts", type=int, default=1, show_default=True,
                     help="Split the scans into this many independent parts."),
        click.option("--overwrite", is_flag=True,
                     help="Replace another method's run (or unrelated files) in the output "
                          "folder."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print one JSON object on stdout (errors included)."),
        click.option("--quiet", is_flag=True, help="No progress report on stderr."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _report_out(report, as_json: bool) -> None:  # noqa: ANN001 - RunReport, imported lazily
    from .evaluation import summary_lines

    err = report.error()
    if as_json:
        payload = report.to_json_dict()
        if err is None:
            click.echo(json.dumps({"ok": True, **payload}))
        else:
            click.echo(json.dumps({"ok": False, "error": {
                "type": type(err).__name__, "message": str(err), "path": str(err.path),
                "exit_code": err.exit_code}, **payload}))
    else:
        for line in summary_lines(report):
            click.echo(line)
        if err is not None:
            click.echo(f"cmbbench: error: {err}", err=True)
    if err is not None:
        sys.exit(err.exit_code)


def _run_command(kind: str, *, method: str, dataset: str, params: tuple[str, ...], as_json: bool,
                 quiet: bool, store: dict | None = None, **kwargs: object) -> None:
    _setup_logging(quiet or as_json)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    from .evaluation import evaluate, predict_dataset
    from .progress import ProgressReporter

    try:
        progress = ProgressReporter(f"{kind} {method}", quiet=quiet)
        common = dict(params=_parse_params(params), progress=progress, quiet=quiet, **kwargs)
        if kind == "predict":
            report = predict_dataset(method, dataset, **common)  # type: ignore[arg-type]
        else:
            report = evaluate(method, dataset, **common)  # type: ignore[arg-type]
    except CmbbenchError as exc:
        _fail(exc, as_json)
        return
    if store is not None:  # evaluate: index the scored run in the results store
        from .cli_store import store_after_evaluate

        store_after_evaluate(report, as_json=as_json, quiet=quiet, **store)
    _report_out(report, as_json)


@main.command("predict")
@_run_options
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Predictions folder to write (also the run directory; re-running resumes).")
def predict_cmd(method: str, dataset: str, params: tuple[str, ...], backend: str,
                workers: int | None, scheduler: str | None, seed: int, part_id: int,
                num_parts: int, overwrite: bool, as_json: bool, quiet: bool, out: Path) -> None:
    """Run a method on a dataset and write a predictions folder (maps + manifest).

    The folder can be scored with `cmbbench score OUT --reference DATASET`.
    """
    _run_command("predict", method=method, dataset=dataset, params=params, as_json=as_json,
                 quiet=quiet, out=out, backend=backend, workers=workers, scheduler=scheduler,
                 seed=seed, part_id=part_id, num_parts=num_parts, overwrite=overwrite)


@main.command("evaluate")
@_run_options
@click.option("--rule", default="cmbbench", show_default=True,
              help="Matching rule: cmbbench, delpozo2024, valdo2021, dou2016, wmh2017.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run directory [default: runs/<method>__<dataset>__<rule>].")
@click.option("--threshold", type=float, default=None,
              help="Operating threshold on candidate scores [default: the rule's].")
@click.option("--floor", type=float, default=None,
              help="Probability floor of candidate extraction [default: the rule's].")
@click.option("--n-boot", type=int, default=1000, show_default=True,
              help="Bootstrap replicates over scans for the CIs (0: none).")
@click.option("--db", "db_url", default=None,
              help="Results store the finished run is imported into (URL or SQLite path) "
                   "[default: $CMBBENCH_DB, else $CMBBENCH_HOME/store.sqlite].")
@click.option("--no-store", is_flag=True, help="Do not import the run into the results store.")
def evaluate_cmd(method: str, dataset: str, params: tuple[str, ...], backend: str,
                 workers: int | None, scheduler: str | None, seed: int, part_id: int,
                 num_parts: int, overwrite: bool, as_json: bool, quiet: bool, rule: str,
                 out: Path | None, threshold: float | None, floor: float | None,
                 n_boot: int, db_url: str | None, no_store: bool) -> None:
    """Run a method on a dataset and score it: prints per-scan mean ± SD and pooled metrics,
    FP per scan, FP per CMB and CPM; results in RUN_DIR/results; the scored run is imported
    into the results store (a store problem is only a warning)."""
    _run_command("evaluate", method=method, dataset=dataset, params=params, as_json=as_json,
                 quiet=quiet, store={"db": db_url, "no_store": no_store}, out=out, rule=rule,
                 n_boot=n_boot,
                 rule_overrides={"operating_threshold": threshold, "candidate_floor": floor},
                 backend=backend, workers=workers, scheduler=scheduler, seed=seed,
                 part_id=part_id, num_parts=num_parts, overwrite=overwrite)


@main.command("merge")
@click.argument("parts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Run directory to merge into (may be one of PARTS).")
@click.option("--overwrite", is_flag=True, help="Replace another run found in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def merge_cmd(parts: tuple[Path, ...], out: Path, overwrite: bool, as_json: bool,
              quiet: bool) -> None:
    """Merge the run directories of --part-id/--num-parts jobs into one; when every scan is
    done, write the manifest (and, for evaluate runs, the scores)."""
    _setup_logging(quiet or as_json)
    from .evaluation import merge

    try:
        report = merge(list(parts), out, overwrite=overwrite, quiet=quiet)
    except CmbbenchError as exc:
        _fail(exc, as_json)
        return
    if report.kind == "evaluate":  # a finished, scored run: index it in the results store
        from .cli_store import store_after_evaluate

        store_after_evaluate(report, db=None, no_store=False, as_json=as_json, quiet=quiet)
    _report_out(report, as_json)


@main.command("train")
@click.option("--method", required=True, help="Registry name of a trainable method (ours).")
@click.option("--recipe", required=True,
              help="Training recipe: a name shipped with the method or a YAML file.")
@click.option("--init", "init", type=click.Path(path_type=Path), default=None,
              help="Checkpoint to start from (fine-tuning); sha256-checked.")
@click.option("--dataset", default=None,
              help="Fine-tune on this dataset (registry name or folder) with a held-out split.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: runs/train/<recipe>].")
@click.option("--steps", type=int, default=None, help="Override the recipe's step count.")
@click.option("--max-minutes", type=float, default=None,
              help="Override the recipe's wall-clock budget (minutes).")
@click.option("--no-resume", is_flag=True, help="Start over even if OUT/last.pt exists.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Where to train [default: the recipe's device, else auto: CUDA when torch "
                   "sees one, else CPU].")
@click.option("--no-calibrate", is_flag=True,
              help="Skip the recipe's calibration step (a later run with the same --out does "
                   "it).")
@click.option("--calibrate-only", is_flag=True,
              help="Train no further: calibrate the best checkpoint of the run in --out (one "
                   "trained elsewhere with --no-calibrate, or cut short).")
@click.option("--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def train_cmd(method: str, recipe: str, init: Path | None, dataset: str | None,
              out: Path | None, steps: int | None, max_minutes: float | None, no_resume: bool,
              device: str | None, no_calibrate: bool, calibrate_only: bool,
              quiet: bool) -> None:
    """Train (or, with --init and --dataset, fine-tune) a trainable method from a recorded
    recipe; logs loss and validation CPM, resumable; prints the best checkpoint's path."""
    _setup_logging(quiet)
    from .methods.registry import load_method_class

    try:
        cls = load_method_class(method)
        fn = getattr(cls, "train_recipe", None)
        if fn is None:
            from .errors import ConfigurationError

            raise ConfigurationError(f"method {method!r} has no recipe-based training")
        say = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
        path = fn(recipe, out=out, init=init, dataset=dataset, steps=steps,
                  max_minutes=max_minutes, resume=not no_resume, device=device,
                  calibrate_after=not no_calibrate, calibrate_only=calibrate_only,
                  progress=say)
    except CmbbenchError as exc:
        _fail(exc, False)
        return
    click.echo(str(path))


@main.command("exit-codes")
def exit_codes() -> None:
    """List the documented exit codes."""
    for code, meaning in sorted(EXIT_CODES.items()):
        click.echo(f"{code:>3}  {meaning}")


from .leaderboard.cli import leaderboard as _leaderboard  # after main is defined

main.add_command(_leaderboard)


# db, validate, submit (cmbbench/cli_store.py)
from .cli_store import register as _register_store  # after the main group

_register_store(main)


if __name__ == "__main__":  # pragma: no cover
    main()
