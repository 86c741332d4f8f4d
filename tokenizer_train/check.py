"""Evaluate the seed's acceptance gates on a run's metrics.jsonl.

Gates (seed section 7, plus this project's own gates):

  codes              val/code_info_bits_epoch >= max(0.25, 4x the baseline's) bits per label
                     (without --baseline: >= 0.25)
                     val/ce_bits_epoch no higher than the baseline's         (needs --baseline)
  within 10 epochs   train/unique_codes_step >= 8 and rising
                     train/entropy_norm_step >= 0.2
                     train/perplexity_step clearly up
                     train/acc_epoch at most 0.02 below the baseline's   (needs --baseline)
  within 30 epochs   train/unique_codes_step >= 32
                     train/entropy_norm_step >= 0.35
                     code-usage histogram multi-modal
                     validation metrics not worse than the baseline's     (needs --baseline)
  project            val/acc_noncenter_epoch at least 0.25 above the baseline's (needs --baseline)

The baseline is ``configs/base.yaml`` as it is (no static filter: the seed's collapsing
setting). Every validation figure is on the evaluation mask (valid AND the build's recorded
filter, docs/DESIGN.md), so a filtered run and the unfiltered baseline score the same labels;
the training-accuracy gate reads train/acc_evalmask_epoch, the same mask on training
batches (runs that lack it fall back to train/acc_epoch, and the gate says so).

Definitions (so that a gate is a number, not a judgement):
- A step metric "at epoch E" is the mean of its values logged during the last 20% of the
  steps of epochs < E (robust to one noisy log interval).
- "rising": that late mean is above the mean of the first 20% of the steps logged.
- "clearly up": late perplexity >= 1.5x the baseline's late perplexity (with --baseline),
  else >= 1.5x the run's own first logged value.
- code information (docs/DESIGN.md): CE with a mixture of the clip's own and 8 other clips'
  codes minus CE with its own, bits per label; 0 when the decoder ignores its codes.
- multi-modal: in the last logged code-usage counts (train/code_usage_hist_global, the
  trainer's all-rank counts of a code-log step, else train/code_usage_hist) no code holds
  more than 50% of the tokens and the effective number of codes exp(H) (H: entropy of the
  usage shares) is at least 3 -- a collapsed tokenizer has one code with ~100% (exp(H) ~ 1),
  a two-state one ("static" / "moving") has exp(H) <= 2, and a healthy spread over many
  codes, each holding well under 2% of a step's tokens, passes.
- validation not worse (the seed: "no obvious degradation"): val/acc_epoch >= baseline - 0.02
  (the same tolerance as the training-accuracy gate) and val/epe_px_epoch at most 2% above
  the baseline's.
- Every validation gate reads each run at ONE epoch, its last (what the run ends with and
  what ``ablate`` tabulates). Taking each metric's best epoch separately would let a run pass
  on a mix of epochs, e.g. non-centre accuracy from an early epoch that predicts one motion
  class everywhere and accuracy from another that predicts the centre everywhere.
A gate whose horizon the run did not reach (fewer epochs) is evaluated on what was run and
marked as such: meeting a 30-epoch target after 5 epochs is within 30 epochs. A gate with
no data fails.
Exit code 0 only when every evaluated gate passes.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from motion_data.atomic import atomic_write_json

MODE_COUNT = 3  # effective number of codes (exp of the usage entropy) a multi-modal histogram needs
MAX_TOP_SHARE = 0.5
PERPLEXITY_FACTOR = 1.5
ACC_TOL = 0.02
EPE_REL_TOL = 0.02
INFO_MIN_BITS = 0.25  # code information a run's codes must carry, bits per label
INFO_BASE_FACTOR = 4.0  # ... and at least this multiple of the baseline's
INFO_GATE = "codes carry information"
# per-code counts of a code-log step, first found wins: all ranks (the trainer's *_global), this rank
USAGE_TAGS = ("train/code_usage_hist_global", "train/code_usage_hist")
TRAIN_ACC_TAGS = ("train/acc_evalmask_epoch", "train/acc_epoch")  # evaluation mask first


@dataclass
class Gate:
    name: str
    value: float | None
    target: str
    passed: bool
    note: str = ""


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {run_dir} a training run folder?)")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                # a run killed mid-write leaves at most one torn last line
                raise ValueError(f"{path}:{i}: malformed JSON line") from None
    return rows


def series(rows: list[dict], tag: str, max_epoch: float | None = None) -> list[tuple[int, float, object]]:
    """``[(step, epoch, value), ...]`` of a tag, keeping the last value logged per step."""
    by_step = {}
    for r in rows:
        if tag in r and (max_epoch is None or r.get("epoch", 0) < max_epoch):
            by_step[r.get("step", 0)] = (r.get("step", 0), r.get("epoch", 0), r[tag])
    return [by_step[k] for k in sorted(by_step)]


def late_mean(rows, tag, max_epoch=None, frac=0.2) -> float | None:
    s = series(rows, tag, max_epoch)
    if not s:
        return None
    k = max(1, int(math.ceil(len(s) * frac)))
    return float(np.mean([v for _, _, v in s[-k:]]))


def early_mean(rows, tag, frac=0.2) -> float | None:
    s = series(rows, tag)
    if not s:
        return None
    k = max(1, int(math.ceil(len(s) * frac)))
    return float(np.mean([v for _, _, v in s[:k]]))


def epochs_run(rows) -> int:
    ep = [r["epoch"] for r in rows if "epoch" in r]
    return int(max(ep)) + 1 if ep else 0


def is_multimodal(counts) -> tuple[bool, float, float]:
    """(multi-modal?, effective number of codes exp(H), top-code share)."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        return False, 0.0, 1.0
    share = c[c > 0] / total
    effective = float(np.exp(-(share * np.log(share)).sum()))
    top = float(share.max())
    return effective >= MODE_COUNT and top <= MAX_TOP_SHARE, effective, top


def _last(rows, tag):
    s = series(rows, tag)
    return s[-1][2] if s else None


def code_gates(rows: list[dict], base: list[dict] | None = None) -> list[Gate]:
    """Code information >= max(0.25, 4x baseline) and, with a baseline, CE not above it
    (each run at its last validation epoch)."""
    info, ce = _last(rows, "val/code_info_bits_epoch"), _last(rows, "val/ce_bits_epoch")
    b_info = _last(base, "val/code_info_bits_epoch") if base is not None else None
    if base is None:
        thr, target = INFO_MIN_BITS, f">= {INFO_MIN_BITS} bits/label"
    elif b_info is None:
        thr, target = None, "baseline's val/code_info_bits_epoch"
    else:
        thr = max(INFO_MIN_BITS, INFO_BASE_FACTOR * b_info)
        target = f">= max({INFO_MIN_BITS}, {INFO_BASE_FACTOR:g} x {b_info:.4g})"
    gates = [Gate(INFO_GATE, info, target, info is not None and thr is not None and info >= thr)]
    if base is not None:
        b_ce = _last(base, "val/ce_bits_epoch")
        gates.append(Gate("val CE bits <= baseline", ce, f"<= {b_ce:.4g}" if b_ce is not None else "baseline",
                          None not in (ce, b_ce) and ce <= b_ce))
    return gates


def _train_acc_tag(rows, base) -> str:
    """train/acc_evalmask_epoch when both runs logged it, else the loss-mask train/acc_epoch."""
    evalmask, lossmask = TRAIN_ACC_TAGS
    return evalmask if series(rows, evalmask) and series(base, evalmask) else lossmask


def evaluate(rows: list[dict], base: list[dict] | None = None) -> list[Gate]:
    gates: list[Gate] = code_gates(rows, base)
    n_ep = epochs_run(rows)

    def horizon(E):
        return "" if n_ep >= E else f"run has {n_ep} epochs < {E}"

    def ge(name, tag, E, thr):
        v = late_mean(rows, tag, E)
        gates.append(Gate(name, v, f">= {thr}", v is not None and v >= thr, horizon(E)))

    ge("unique_codes@10", "train/unique_codes_step", 10, 8)
    late, early = late_mean(rows, "train/unique_codes_step", 10), early_mean(rows, "train/unique_codes_step")
    gates.append(Gate("unique_codes rising", late, f"> first {early}", late is not None and early is not None and late > early,
                      horizon(10)))
    ge("entropy_norm@10", "train/entropy_norm_step", 10, 0.2)
    ppl = late_mean(rows, "train/perplexity_step", 10)
    ref = late_mean(base, "train/perplexity_step", 10) if base else early_mean(rows, "train/perplexity_step")
    gates.append(Gate("perplexity clearly up", ppl, f">= {PERPLEXITY_FACTOR} x {ref}",
                      ppl is not None and ref is not None and ppl >= PERPLEXITY_FACTOR * ref, horizon(10)))
    if base is not None:
        tag = _train_acc_tag(rows, base)
        a = [v for _, _, v in series(rows, tag, 10)]
        b = [v for _, _, v in series(base, tag, 10)]
        ok = bool(a and b and a[-1] >= b[-1] - ACC_TOL)
        note = "; ".join(x for x in (horizon(10), "" if tag == TRAIN_ACC_TAGS[0] else f"{tag}: the runs' own loss masks")
                         if x)
        gates.append(Gate("acc_epoch vs baseline@10", a[-1] if a else None, f">= {b[-1] - ACC_TOL:.4f}" if b else "baseline",
                          ok, note))
    ge("unique_codes@30", "train/unique_codes_step", 30, 32)
    ge("entropy_norm@30", "train/entropy_norm_step", 30, 0.35)
    hist = next((h for h in (series(rows, t) for t in USAGE_TAGS) if h), None)
    if hist and isinstance(hist[-1][2], list):
        ok, effective, top = is_multimodal(hist[-1][2])
        gates.append(Gate("code usage multi-modal", effective, f"exp(H) >= {MODE_COUNT} codes, top <= {MAX_TOP_SHARE:.0%}",
                          ok, f"top code share {top:.2f}; " + horizon(30)))
    else:
        gates.append(Gate("code usage multi-modal", None, "code usage counts logged", False, "no code usage counts in metrics.jsonl"))
    if base is not None:
        va, vb = _last(rows, "val/acc_epoch"), _last(base, "val/acc_epoch")
        ea, eb = _last(rows, "val/epe_px_epoch"), _last(base, "val/epe_px_epoch")
        ok = None not in (va, vb, ea, eb) and va >= vb - ACC_TOL and ea <= eb * (1 + EPE_REL_TOL)
        gates.append(Gate("val not worse than baseline", va,
                          f"acc >= {vb} - {ACC_TOL}, epe {ea} <= {eb} x {1 + EPE_REL_TOL}", bool(ok)))
        na, nb = _last(rows, "val/acc_noncenter_epoch"), _last(base, "val/acc_noncenter_epoch")
        ok = na is not None and nb is not None and na >= nb + 0.25
        gates.append(Gate("val non-centre acc >= baseline + 0.25", na, f">= {nb} + 0.25" if nb is not None else "baseline", ok))
    return gates


def format_table(gates: list[Gate]) -> str:
    lines = [f"{'gate':42s} {'value':>10s}  {'target':40s} result"]
    for g in gates:
        v = "-" if g.value is None else f"{g.value:.4g}"
        lines.append(f"{g.name:42s} {v:>10s}  {g.target[:40]:40s} {'PASS' if g.passed else 'FAIL'}"
                     + (f"  ({g.note})" if g.note else ""))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("run", help="training run folder (holds metrics.jsonl)")
    p.add_argument("--baseline", help="run folder of the baseline to compare against (enables the relative gates)")
    p.add_argument("--json", help="also write the gate results to this JSON file")


def verdict(gates: list[Gate]) -> str:
    """The one-line verdict; it leads with whether the codes carry information."""
    info = next((g for g in gates if g.name == INFO_GATE), None)
    if info is None:
        lead = "CODE INFORMATION NOT GATED"
    elif info.value is None:
        lead = "CODE INFORMATION NOT LOGGED (no val/code_info_bits_epoch)"
    else:
        lead = (f"CODES {'CARRY' if info.passed else 'DO NOT CARRY'} INFORMATION "
                f"({info.value:.3f} bits/label, target {info.target})")
    ok = all(g.passed for g in gates)
    return f"{lead}; {'ALL GATES PASS' if ok else 'SOME GATES FAIL'} ({sum(g.passed for g in gates)}/{len(gates)})"


def report(gates: list[Gate], json_path=None) -> bool:
    """Print the gate table and the verdict line, write ``json_path`` if given; all passed?"""
    print(format_table(gates))
    ok = all(g.passed for g in gates)
    print(f"\n{verdict(gates)}")
    if json_path:
        atomic_write_json(json_path, {"passed": ok, "gates": [asdict(g) for g in gates]}, indent=2)
    return ok


def run(args) -> int:
    rows = read_metrics(args.run)
    base = read_metrics(args.baseline) if args.baseline else None
    gates = evaluate(rows, base)
    ok = report(gates, args.json)
    if any(not g.passed and g.name.startswith(("val non-centre", "val not worse")) for g in gates):
        print(f"hint: python -m tokenizer_train frontier --run {args.run} --data BUILD shows whether any "
              f"centre-logit offset (i.e. any re-weighting) of this model could meet the validation gates")
    return 0 if ok else 1
