"""Train the baseline and each mitigation on the same data, split and seeds; compare them.

  python -m tokenizer_train ablate --config configs/base.yaml --data BUILD --out DIR \\
      [--variants configs/variants.yaml] [--epochs N] [--seeds 0,1] [--set k=v ...]

Each run's config is: --config, then the variant's overrides, then the --set overrides
(common to every run, e.g. the model size), then --epochs and the training seed. The baseline is
--config alone (configs/base.yaml as it is: no static filter, the collapsing setting of
the original plan, the staged plan this project implements); a variant that trains with a
filter carries it (configs/recommended.yaml does).
Validation figures need no common filter: every run is scored on the evaluation mask.

A variants file maps a name to dotted overrides; "include: FILE" (relative to the
variants file) first applies every leaf of that YAML file, e.g. the recommended config:

  entropy:
    training.code_entropy_weight: 0.1
  recommended:
    include: recommended.yaml

DIR/runs/<variant>/seed<k>/ holds each training run (TensorBoard logs, metrics.jsonl,
checkpoints) and, once finished, done.json; a run with done.json is not rerun, an
interrupted one resumes from its last.pt. DIR/results.csv and DIR/results.md get one row per
variant: code information in bits per label first (validation, last epoch), unique codes,
normalised entropy and perplexity (train steps of the last epoch, as the original plan logs them),
accuracy, non-centre accuracy, CE in bits, AUC moving vs static, EPE in px next to the zero
predictor's and the zero-motion code share (validation, last epoch, all on the evaluation
mask: valid AND the build's recorded filter, whatever filter the variant trains with), each
as mean ± spread (std over seeds) and as delta against the baseline of the same seed, plus
how many acceptance gates (see check) the variant
passes against that baseline (gates at 10 or 30 epochs that the runs are too short for are
not counted). --only baseline runs the baseline alone. Plots: DIR/code_usage.png,
DIR/entropy.png, DIR/accuracy.png. Progress bars (stderr): the runs, each run's training
and validation, then each run's frontier.
(CE: cross-entropy of the labels under the decoder, bits per label; AUC: area under the ROC
curve of moving vs static points scored by 1 - p(centre); EPE: end-point error of the
predicted displacement, px)
"""
from __future__ import annotations

from motion_data.common.errors import SettingError, UserError

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from motion_data.common.atomic import atomic_open, atomic_write_json, atomic_write_text

from tokenizer_train.evaluate import check as C
from tokenizer_train.common.config import Config, add_set_argument, parse_override, to_dict
from tokenizer_train.common.stop import Stopped
from tokenizer_train.experiments.variants import BASELINE, CONFIG_DIR, DEFAULT_VARIANTS, FILTERED, load_variants, resolve

DONE = "done.json"

# (column, metrics.jsonl tag, how): "late" = mean over the last 20% of the step logs of the
# last epoch; "last" = value of the last epoch
METRICS = [
    ("code_info_bits", "val/code_info_bits_epoch", "last"),  # first: do the codes carry motion?
    ("unique_codes", "train/unique_codes_step", "late"),
    ("entropy_norm", "train/entropy_norm_step", "late"),
    ("perplexity", "train/perplexity_step", "late"),
    ("acc", "val/acc_epoch", "last"),
    ("acc_noncenter", "val/acc_noncenter_epoch", "last"),
    ("ce_bits", "val/ce_bits_epoch", "last"),
    ("auc_moving", "val/auc_moving_epoch", "last"),
    ("epe_px", "val/epe_px_epoch", "last"),
    ("epe_zero_px", "val/epe_zero_px_epoch", "last"),
    ("zero_code_share", "val/zero_code_frac_epoch", "last"),
    # frontier.py on the last checkpoint: the best val non-centre accuracy over centre-logit
    # offsets that keep val accuracy within check.ACC_TOL of the all-centre predictor's
    ("noncentre_at_acc_tol", None, "frontier"),
]
NOT_LOGGED = "not logged"  # a figure a run did not log is never replaced by another one


# --------------------------------------------------------------------------- runs
@dataclass
class RunSpec:
    variant: str
    seed: int
    cfg: Config
    dir: Path

    @property
    def done(self) -> Path:
        return self.dir / DONE


def run_one(spec: RunSpec, data_dir: Path, train_fn=None, progress: bool = True) -> str:
    """Train one run unless finished; returns "done" (skipped), "resumed" or "trained"."""
    from tokenizer_train.model import checkpoint as ckpt
    from tokenizer_train.train import trainer as T
    from tokenizer_train.train import setup as S

    train_fn = train_fn or T.train
    want = to_dict(spec.cfg)
    if spec.done.exists():
        have = json.loads(spec.done.read_text()).get("config")
        if have != want:
            raise SettingError(f"{spec.dir}: finished with a different config; delete it or use another --out")
        return "done"
    resume = ckpt.has_last(spec.dir)  # last.prev.pt alone (a torn last.pt) is resumable too
    t0 = time.perf_counter()
    S.seed_everything(spec.cfg.training.seed)
    # a run that died before its first checkpoint starts afresh: the run folder's own rule
    # (run_folder.check_fresh) removes its stale files, and only those
    train_fn(spec.cfg, data_dir, spec.dir, resume=resume, progress=progress, overwrite=not resume)
    atomic_write_json(spec.done, {"variant": spec.variant, "seed": spec.seed, "config": want,
                            "wall_s": round(time.perf_counter() - t0, 2), "resumed": resume})
    return "resumed" if resume else "trained"


def frontier_summary(spec: RunSpec, data_dir: Path, progress: bool = False) -> float | None:
    """noncentre_at_acc_tol of a finished run (frontier.cached_frontier); None (not logged)
    without a validation split or checkpoint; nan when no offset stays within the tolerance."""
    from tokenizer_train.evaluate import frontier as F
    from tokenizer_train.common.distributed import pick_device

    if spec.cfg.data.val_split <= 0 or not (spec.dir / "last.pt").exists():
        return None
    best = F.cached_frontier(spec.dir, data_dir, pick_device(spec.cfg.training.device), progress)["summary"][
        "best_noncenter_within_tol"]
    return math.nan if best is None else float(best)


def summarize(rows: list[dict]) -> dict:
    """The table's numbers of one run from its metrics.jsonl rows."""
    out = {}
    for col, tag, how in METRICS:
        if how == "frontier":
            continue
        s = C.series(rows, tag)
        if not s:
            out[col] = None  # not logged (e.g. no validation split): said so, never filled in
        elif how == "late":
            # the mean over the last 20% of the last epoch's step logs
            last_ep = s[-1][1]
            vals = [v for _, e, v in s if e == last_ep]
            k = max(1, int(math.ceil(len(vals) * 0.2)))
            out[col] = float(np.mean(vals[-k:]))
        else:  # metrics.jsonl logs a non-finite value (an AUC without moving labels) as null
            out[col] = math.nan if s[-1][2] is None else float(s[-1][2])
    return out


def _mean_spread(x) -> tuple[float, float]:
    x = np.asarray([v for v in x if v is not None and not math.isnan(v)], np.float64)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std()) if x.size > 1 else 0.0


def aggregate(per_run: dict[tuple[str, int], dict], gates: dict[tuple[str, int], list], variants: list[str],
              seeds: list[int]) -> list[dict]:
    """One row per variant: mean/std over seeds of each metric and of its delta vs baseline."""
    table = []
    for v in variants:
        row = {"variant": v, "seeds": len(seeds)}
        for col, _, _ in METRICS:
            vals = [per_run[(v, s)][col] for s in seeds]
            base = [per_run[(BASELINE, s)][col] for s in seeds]
            if any(x is None for x in vals):
                row[col] = row[f"{col}_std"] = row[f"{col}_delta"] = row[f"{col}_delta_std"] = None
                continue
            row[col], row[f"{col}_std"] = _mean_spread(vals)
            if any(x is None for x in base):
                row[f"{col}_delta"] = row[f"{col}_delta_std"] = None
            else:
                row[f"{col}_delta"], row[f"{col}_delta_std"] = _mean_spread([a - b for a, b in zip(vals, base)])
        gl = [gates[(v, s)] for s in seeds] if v != BASELINE else []
        # gates the runs are too short for count neither way (check: "not reached")
        row["gates_passed"] = float(np.mean([C.counts(x)[0] for x in gl])) if gl else math.nan
        row["gates_total"] = sum(C.counts(gl[0])[:2]) if gl else 0
        failed = sorted({g.name for x in gl for g in x if g.result == "FAIL"})
        row["failed_gates"] = "; ".join(failed)
        table.append(row)
    return table


def csv_columns() -> list[str]:
    cols = ["variant", "seeds"]
    for col, _, _ in METRICS:
        cols += [col, f"{col}_std", f"{col}_delta", f"{col}_delta_std"]
    return cols + ["gates_passed", "gates_total", "failed_gates"]


def write_csv(path: Path, table: list[dict]):
    cols = csv_columns()
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in table:
            w.writerow([f"{r[c]:.6g}" if isinstance(r[c], float) else NOT_LOGGED if r[c] is None else r[c]
                        for c in cols])


def _fmt(m, s, digits=3, sign=False):
    if m is None:
        return NOT_LOGGED
    if math.isnan(m):
        return "-"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f.format(m) + (f" ± {s:.{digits}f}" if s > 0 else "")


HEAD = {"code_info_bits": "code information (bits/label)", "ce_bits": "val CE (bits/label)",
        "auc_moving": "val AUC moving", "epe_zero_px": "val EPE px of zero motion", "unique_codes": "unique codes", "entropy_norm": "entropy (norm)", "perplexity": "perplexity",
        "acc": "val acc", "acc_noncenter": "val non-centre acc", "epe_px": "val EPE px",
        "zero_code_share": "zero-code share", "noncentre_at_acc_tol": "val non-centre acc at acc tol"}


def markdown(table: list[dict], title: str = "") -> str:
    cols = [c for c, _, _ in METRICS]
    lines = []
    if title:
        lines += [title, ""]
    lines.append("| variant | " + " | ".join(HEAD[c] for c in cols) + " | gates |")
    lines.append("|---|" + "---:|" * len(cols) + "---:|")
    for r in table:
        cells = []
        for c in cols:
            d = 1 if c in ("unique_codes", "perplexity") else 2 if c == "code_info_bits" else 3
            cell = _fmt(r[c], r[f"{c}_std"], d)
            if r["variant"] != BASELINE and r[f"{c}_delta"] is not None and not math.isnan(r[f"{c}_delta"]):
                cell += f" ({_fmt(r[f'{c}_delta'], r[f'{c}_delta_std'], d, sign=True)})"
            cells.append(cell)
        g = "-" if r["variant"] == BASELINE else f"{r['gates_passed']:g}/{r['gates_total']}"
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {g} |")
    lines.append("")
    lines.append("Values: mean ± std over seeds; (delta vs the baseline of the same seed). Code information: CE "
                 "with a mixture of the clip's own and 8 other clips' codes minus CE with its own (0: the decoder "
                 "ignores its codes; at most log2(9) = 3.17). Validation figures (last epoch) are all on the "
                 "evaluation mask: valid AND the build's recorded filter, whatever filter a run trains with. Code "
                 "statistics: train steps of the last epoch. val non-centre "
                 "acc at acc tol: the best validation non-centre accuracy over centre-logit offsets that keep "
                 "validation accuracy within 0.02 of predicting the centre everywhere (`python -m "
                 "tokenizer_train frontier`; a re-weighting only moves a run along this trade-off, a better "
                 "model raises it). gates: acceptance gates passed against the baseline (`python -m "
                 "tokenizer_train check`).")
    failing = [r for r in table if r["variant"] != BASELINE and r["failed_gates"]]
    if failing:
        lines += ["", "Failed gates:", ""]
        lines += [f"- {r['variant']}: {r['failed_gates']}" for r in failing]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- driver
def plan(base_cfg, variants: dict[str, dict], out: Path, seeds: list[int], sets=(), epochs=None) -> list[RunSpec]:
    specs = []
    for name, ov in [(BASELINE, {})] + list(variants.items()):
        for s in seeds:
            specs.append(RunSpec(name, s, resolve(base_cfg, ov, sets, epochs, s), out / "runs" / name / f"seed{s}"))
    return specs


@dataclass(frozen=True)
class RunGrid:
    """The runs of an ablation: the baseline config ``base_cfg`` (a YAML path, or None for the
    defaults) and each of ``variants``' overrides on it, then the common ``sets`` overrides and
    ``epochs``, each with every training seed of ``seeds``."""
    base_cfg: object
    variants: dict[str, dict]
    seeds: Sequence[int] = (0,)
    sets: Mapping | Sequence = ()  # a mapping or (dotted key, value) pairs, as variants.resolve takes
    epochs: int | None = None


def ablate(grid: RunGrid, data_dir, out, progress: bool = True, plots: bool = True, train_fn=None) -> list[dict]:
    """Train (or skip, or resume) every run, then write results.csv/md and the plots."""
    out, data_dir = Path(out), Path(data_dir)
    variants, seeds = grid.variants, [int(s) for s in grid.seeds]
    specs = plan(grid.base_cfg, variants, out, seeds, grid.sets, grid.epochs)  # every config is checked before training
    out.mkdir(parents=True, exist_ok=True)
    status = {}
    bar = tqdm(specs, desc="ablate", unit="run", disable=not progress, dynamic_ncols=True)
    for spec in bar:
        bar.set_postfix_str(f"{spec.variant} seed {spec.seed}")
        status[(spec.variant, spec.seed)] = run_one(spec, data_dir, train_fn, progress)
    bar.close()
    names = [BASELINE] + list(variants)
    rows = {(s.variant, s.seed): C.read_metrics(s.dir) for s in specs}
    per_run = {k: summarize(r) for k, r in rows.items()}
    bar = tqdm(specs, desc="ablate: frontier of each run", unit="run", disable=not progress, dynamic_ncols=True)
    for spec in bar:
        bar.set_postfix_str(f"{spec.variant} seed {spec.seed}")
        per_run[(spec.variant, spec.seed)]["noncentre_at_acc_tol"] = frontier_summary(spec, data_dir, progress)
    bar.close()
    # with the filtered baseline among the variants, every other variant is also gated against it
    fb = {s: rows[(FILTERED, s)] for s in seeds} if FILTERED in variants else {}
    gates = {(v, s): C.evaluate(rows[(v, s)], rows[(BASELINE, s)], fb.get(s) if v != FILTERED else None)
             for v in variants for s in seeds}
    table = aggregate(per_run, gates, names, seeds)
    write_csv(out / "results.csv", table)
    atomic_write_text(out / "results.md", markdown(table, f"# Ablation on {data_dir} ({len(seeds)} seed(s): "
                                                    f"{', '.join(map(str, seeds))})"))
    atomic_write_json(out / "status.json", {f"{v}/seed{s}": st for (v, s), st in status.items()})
    if plots:
        from tokenizer_train.experiments.ablate_plots import plot_all  # matplotlib only when plotting

        plot_all(out, rows, names, seeds[0])
    return table


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be a comma list of integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must list distinct integers, got {text!r}")
    return seeds


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--config", default=str(CONFIG_DIR / "base.yaml"), help="baseline YAML config (default: %(default)s)")
    p.add_argument("--data", required=True, help="build folder from python -m preprocess build-shards")
    p.add_argument("--out", required=True, help="output folder (runs/, results.csv, results.md, plots); rerun to resume")
    p.add_argument("--variants", default=str(DEFAULT_VARIANTS),
                   help="YAML mapping variant name -> dotted overrides (default: %(default)s)")
    p.add_argument("--only", help="comma list of variant names to run, besides the baseline, which always runs; "
                                  "--only baseline runs it alone (default: all in --variants)")
    p.add_argument("--epochs", type=int, help="training epochs of every run (overrides training.epochs)")
    p.add_argument("--seeds", default="0", help="comma list of training seeds (training.seed); every variant runs each (default: %(default)s)")
    add_set_argument(p, "override a config key in every run, baseline included")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars (runs, training, frontiers)")


def run(args) -> int:
    try:
        seeds = parse_seeds(args.seeds)
        variants = load_variants(args.variants)
        if args.only:
            keep = [x.strip() for x in args.only.split(",") if x.strip()]
            unknown = [x for x in keep if x not in variants and x != BASELINE]
            if unknown:
                raise SettingError(f"--only: unknown variant(s) {', '.join(unknown)} "
                                  f"(have {', '.join([BASELINE, *variants])})")
            variants = {k: variants[k] for k in keep if k != BASELINE}  # the baseline always runs
        if args.epochs is not None and args.epochs < 1:
            raise ValueError("--epochs must be >= 1")
        if not Path(args.data).is_dir():
            raise FileNotFoundError(f"{args.data}: no such build folder")
        overrides = [parse_override(t) for t in args.set]
    except (SettingError, ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None  # one line from the dispatcher (exit 2)
    # the user's errors while training (UserError) are one line from the dispatcher; a bug keeps its traceback
    try:
        ablate(RunGrid(args.config, variants, seeds, overrides, args.epochs), args.data, args.out,
               progress=not args.no_progress, plots=not args.no_plots)
    except Stopped as e:  # Ctrl-C or SIGTERM: the run in progress saved its checkpoint
        print(f"python -m tokenizer_train ablate: {e.message().split('; resume with')[0]}; run the same ablate "
              f"command again to go on (finished runs are kept)", file=sys.stderr)
        return e.exit_code
    print((Path(args.out) / "results.md").read_text())
    print(f"wrote {args.out}/results.csv, results.md, code_usage.png, entropy.png, accuracy.png"
          if not args.no_plots else f"wrote {args.out}/results.csv, results.md")
    return 0
