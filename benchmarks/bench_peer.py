"""AMPLIFY's own motion tokenizer next to this project's, trained on the same build's training
split and scored by the same metrics on the same evaluation mask.

AMPLIFY (pairlab/AMPLIFY) is used from a source tree the user passes with --amplify-src; it is
never copied into this repository. Its model (``amplify.models.motion_tokenizer.MotionTokenizer``),
its loss (``amplify.models.losses.compute_relative_classification_loss``) and its label function
(``get_autoregressive_indices_efficient``, called by that loss) run unchanged; imports the
track-only tokenizer never uses (vision encoders, wandb, hydra, plotting, the LIBERO loader) are
stubbed. Its config file (cfg/train_motion_tokenizer.yaml) is read and overridden with the
project run's width, depth, heads, dropout, FSQ levels and clip size, single view
(agentview, loss weight 1).

Rows (``--rows``):
- ``amplify``: AMPLIFY as published at the project's size and optimiser: its loss over every
  point and step, no filter;
- ``amplify+filter``: the same with the project's static filter (the loss averaged over the
  loss mask: filter AND valid), the fair peer;
- ``run:PATH``: a run of this project (its best.pt), scored by the same code.
Training: the project run's epochs, batch size, AdamW learning rate and weight decay, lr
schedule and gradient clipping (``--config``), uniform sampling of the training split.

Scores (all on the validation split): code information (other clips that share no frame, as
the trainer's, docs/DESIGN.md), CE bits, AUC moving vs static, accuracy, non-centre accuracy,
EPE and the zero predictor's EPE on the evaluation mask, codes used; and, over every valid
point step, EPE and the false-motion share (steps whose true label is the centre class that
are decoded as another class).

    pip install omegaconf positional-encodings einops     # AMPLIFY's own imports
    python benchmarks/bench_peer.py --amplify-src ~/src/AMPLIFY --data BUILD \\
        --config configs/base.yaml --rows amplify,amplify+filter,run:runs/rec --seeds 0,1,2 --json peer.json
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from motion_data.build.folder import BuildDir  # noqa: E402
from motion_data.common.labels import center_class, class_offsets, half_window  # noqa: E402
from motion_data.read.loader import LoaderOptions, make_loader  # noqa: E402
from tokenizer_train.evaluate.code_info import code_info_counts  # noqa: E402
from tokenizer_train.common.config import load_config  # noqa: E402
from tokenizer_train.model.model_inputs import entry_clip, model_kwargs, take, with_index  # noqa: E402
from tokenizer_train.evaluate.quality import Quality  # noqa: E402
from tokenizer_train.train.schedule import build_scheduler, clip_gradients  # noqa: E402
from tokenizer_train.evaluate.validate import clip_places, pair_up  # noqa: E402

# what AMPLIFY's package imports but its track-only tokenizer never calls
STUBS = {
    "amplify": None,  # the package itself: its __init__ imports the full policy model
    "amplify.models.encoders.vision_encoders": {"VisionEncoder": object},
    "amplify.utils.train": {"get_root_dir": lambda: ".", "unwrap_compiled_state_dict": lambda s: s},
    "amplify.utils.vis_utils": {"vis_pred": None, "vis_attn_map": None, "vis_attn_mask": None},
    "imageio": {}, "scipy": {}, "scipy.interpolate": {"CubicSpline": None},
    "torchvision": {}, "torchvision.transforms": {},
    "hydra": {}, "hydra.core": {}, "hydra.core.hydra_config": {"HydraConfig": None},
}


class Amplify:
    """AMPLIFY's modules, imported from ``src`` with the unused imports stubbed."""

    def __init__(self, src):
        src = Path(src).expanduser().resolve()
        if not (src / "amplify" / "models" / "motion_tokenizer.py").is_file():
            raise SystemExit(f"{src}: not an AMPLIFY source tree (no amplify/models/motion_tokenizer.py); "
                             f"pass --amplify-src a checkout of pairlab/AMPLIFY")
        for name, attrs in STUBS.items():
            if name in sys.modules and name != "amplify":
                continue
            mod = types.ModuleType(name)
            if attrs is None:
                mod.__path__ = [str(src / "amplify")]
            else:
                mod.__dict__.update(attrs)
                mod.__path__ = []
            sys.modules[name] = mod
        sys.path.insert(0, str(src))
        self.src = src
        self.mt = importlib.import_module("amplify.models.motion_tokenizer")
        self.losses = importlib.import_module("amplify.models.losses")
        self.data = importlib.import_module("amplify.utils.data_utils")
        from omegaconf import OmegaConf

        self.OmegaConf = OmegaConf

    def config(self, cfg, N: int, T: int, ref_size: int):
        """AMPLIFY's own tokenizer config at the project run's sizes, single view."""
        oc = self.OmegaConf.load(self.src / "cfg" / "train_motion_tokenizer.yaml")
        levels = list(cfg.model.fsq_levels)
        size = next((2 ** p for p in range(4, 13) if _fsq_level(self.mt, 2 ** p) == levels), None)
        if size is None:
            raise SystemExit(f"AMPLIFY's get_fsq_level has no codebook size for FSQ levels {levels}")
        over = {"hidden_dim": cfg.model.hidden_dim, "num_layers": cfg.model.num_layers,
                "num_heads": cfg.model.num_heads, "attn_pdrop": cfg.model.dropout, "codebook_size": size,
                "num_tracks": N, "track_pred_horizon": T, "true_horizon": T, "img_shape": [ref_size, ref_size],
                "cond_cameraviews": ["agentview"], "decoder_mlp_hidden_dim": cfg.model.amplify_mlp_dim,
                "cond_on_img": False, "per_view": False}
        for k, v in over.items():
            oc[k] = v
        oc.loss.loss_weights.agentview = 1.0  # one view: its loss unscaled
        oc.loss.cls_img_size = [ref_size, ref_size]
        return oc

    def traj(self, positions, ref_size: int):
        """Project positions ``(B, T, N, 2)`` px (x, y) -> AMPLIFY's ``(B, 1, T, N, 2)`` (row, col) in [-1, 1]."""
        return self.data.normalize_traj(positions.flip(-1), (ref_size, ref_size))[:, None]

    def labels(self, traj, oc):
        """AMPLIFY's own label of every step ``(B, T-1, N)``."""
        idx = self.data.get_autoregressive_indices_efficient(traj[:, :, :-1], traj[:, :, 1:], oc.loss.cls_img_size,
                                                             oc.loss.rel_cls_img_size)
        return idx["relative"][:, 0]


def _fsq_level(mt, size):
    try:
        return list(mt.get_fsq_level(size))
    except UnboundLocalError:  # sizes it has no levels for
        return None


# ------------------------------------------------------------------ one scorer for every model
@torch.no_grad()
def score(encode, decode, loader, where, W: int, device) -> dict:
    """The project's figures of a tokenizer given ``encode(batch) -> (quantized, codes)`` and
    ``decode(quantized, batch, index) -> (P, W*W)`` logits at the flat ``index``."""
    found, codes_seen = {}, set()
    for b in loader:
        b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
        q, codes = encode(b)
        found.update(zip(b["clip_id"], q.float().cpu()))
        codes_seen.update(codes.reshape(-1).tolist())
    ids = sorted(found)
    row = {c: i for i, c in enumerate(ids)}
    pool = torch.stack([found[c] for c in ids]).to(device)
    others = pair_up(ids, where, loader.dataset.S + 1)
    quality, c = Quality(W), center_class(W)
    epe_all = n_all = false_move = n_static = 0.0
    for b in loader:
        b = with_index(b, "eval_index", "eval_mask")
        b = with_index(b, "valid_index", "valid")
        b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
        sel = b["eval_index"]
        q = pool[[row[x] for x in b["clip_id"]]]
        lab, m, vel = take(b["labels"], sel), take(b["eval_mask"], sel), take(b["velocities"], sel)
        logits = decode(q, b, sel).float()
        info = code_info_counts(lambda z: decode(z, b, sel), q, pool, others[[row[x] for x in b["clip_id"]]], lab, m,
                                entry_clip(sel, b["labels"].shape).to(device), own_logits=logits)
        quality.add(logits, lab, vel, m, info)
        # every valid point step: EPE and false motion
        vs = b["valid_index"]
        z, lv = decode(q, b, vs).float(), take(b["labels"], vs)
        off = torch.as_tensor(class_offsets(W), device=device)
        true_px = take(b["velocities"], vs).float() * half_window(W)
        epe_all += float(torch.linalg.vector_norm(torch.softmax(z, -1) @ off - true_px, dim=-1).sum())
        n_all += len(vs)
        static = lv == c
        false_move += float((z.argmax(-1)[static] != c).sum())
        n_static += float(static.sum())
    out = {k.split("/")[1].removesuffix("_epoch"): v for k, v in quality.scalars("val", "epoch").items()}
    out.update(codes_used=len(codes_seen), epe_px_all_valid=epe_all / max(n_all, 1),
               false_motion_share=false_move / max(n_static, 1))
    return out


# ------------------------------------------------------------------ AMPLIFY's training
def train_amplify(amp: Amplify, cfg, build_dir, filtered: bool, seed: int, device, log) -> torch.nn.Module:
    b = BuildDir(build_dir)
    torch.manual_seed(seed)
    np.random.seed(seed)
    oc = amp.config(cfg, b.N, b.T, b.ref_size)
    model = amp.mt.MotionTokenizer(oc).to(device)
    tc = cfg.training
    # the fair peer trains on the loss mask of configs/recommended.yaml's filter; as published, on every step
    flt = load_config(REPO / "configs" / "recommended.yaml").data.static_filter if filtered else cfg.data.static_filter
    loader = make_loader(build_dir, LoaderOptions(batch_size=tc.batch_size, seed=seed, num_workers=0), split="train",
                         val_split=cfg.data.val_split, static_filter=flt)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    sched = build_scheduler(opt, tc.lr_schedule, len(loader) * tc.epochs, tc.learning_rate)
    t0 = time.perf_counter()
    for epoch in range(tc.epochs):
        loader.set_epoch(epoch)
        model.train()
        tot = n = 0.0
        for batch in loader:
            traj = amp.traj(batch["positions"].to(device), b.ref_size)
            vel = torch.diff(traj, dim=2)
            _, _, rel_logits = model(vel)
            per = amp.losses.compute_relative_classification_loss(rel_logits, traj[:, :, 1:], traj[:, :, :-1],
                                                                  oc.loss)[:, 0]  # (B, T-1, N)
            if filtered:  # the project's loss mask: filter AND valid
                m = batch["mask"].to(device).float()
                loss = (per * m).sum() / m.sum().clamp_min(1)
            else:  # as published: every point and step
                loss = per.mean()
            loss.backward()
            clip_gradients(model.parameters(), tc.clip_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            tot, n = tot + float(loss.detach()), n + 1
        log(f"  amplify{'+filter' if filtered else ''} seed {seed} epoch {epoch}: loss {tot / max(n, 1):.4f} "
            f"({time.perf_counter() - t0:.0f} s)")
    model.eval()
    model.oc = oc
    return model


def amplify_scorer(amp: Amplify, model, ref_size: int, N: int):
    def encode(b):
        traj = amp.traj(b["positions"], ref_size)
        z = model.encode(torch.diff(traj, dim=2))
        q, idx = model.quantize(z)
        return q, idx

    def decode(q, b, index):
        _, rel_logits = model.decode(q)  # (B, T-1 * N, W*W), step-major
        B = q.shape[0]
        return take(rel_logits.reshape(B, -1, N, rel_logits.shape[-1]), index)

    return encode, decode


def run_scorer(run_dir, device):
    from tokenizer_train.model.checkpoint import load_model

    model, _, _ = load_model(run_dir, "best", device)
    model.eval()

    def encode(b):
        out = model.encode(b["velocities"], **model_kwargs(b))
        return out["quantized"], out["codes"]

    def decode(q, b, index):
        return model.decode(q, **model_kwargs(b), index=index)

    return encode, decode


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--amplify-src", help="a checkout of pairlab/AMPLIFY (needed for the amplify rows)")
    ap.add_argument("--data", required=True, help="the build folder (its training split trains, validation scores)")
    ap.add_argument("--config", default=str(REPO / "configs" / "base.yaml"),
                    help="the project config whose sizes, epochs and optimiser the AMPLIFY rows use "
                         "(default: configs/base.yaml)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of --config")
    ap.add_argument("--rows", default="amplify,amplify+filter", help="comma list: amplify, amplify+filter, run:PATH")
    ap.add_argument("--seeds", default="0", help="comma list of seeds for the amplify rows")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--json", help="write every row's figures here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cfg = load_config(args.config, args.set)
    build = BuildDir(args.data)
    where = clip_places(build)
    val = make_loader(args.data, LoaderOptions(batch_size=cfg.training.batch_size, num_workers=0), split="val",
                      val_split=cfg.data.val_split, static_filter=cfg.data.static_filter)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    amp = Amplify(args.amplify_src) if any(r.startswith("amplify") for r in rows) else None
    results = []
    if amp is not None:  # AMPLIFY's label function and the project's label the same steps alike
        oc = amp.config(cfg, build.N, build.T, build.ref_size)
        same = total = 0
        for b in val:
            got = amp.labels(amp.traj(b["positions"], build.ref_size), oc)
            same, total = same + int((got == b["labels"])[b["valid"]].sum()), total + int(b["valid"].sum())
        print(f"labels: AMPLIFY's get_autoregressive_indices_efficient equals the project's on {same}/{total} "
              f"valid validation steps", flush=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    for r in rows:
        if r.startswith("run:"):
            enc, dec = run_scorer(r[4:], device)
            res = [{"row": r, "seed": None, **score(enc, dec, val, where, build.W, device)}]
        elif r in ("amplify", "amplify+filter"):
            res = []
            for s in [int(x) for x in args.seeds.split(",")]:
                model = train_amplify(amp, cfg, args.data, r == "amplify+filter", s, device, log)
                enc, dec = amplify_scorer(amp, model, build.ref_size, build.N)
                res.append({"row": r, "seed": s, **score(enc, dec, val, where, build.W, device)})
        else:
            raise SystemExit(f"--rows: unknown row {r!r}; use amplify, amplify+filter or run:PATH")
        results += res
        for x in res:
            print(json.dumps(x), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    keys = ("code_info_bits", "ce_bits", "epe_px", "epe_zero_px", "acc_noncenter", "codes_used", "epe_px_all_valid",
            "false_motion_share")
    print(f"{'row':<28}" + "".join(f"{k:>20}" for k in keys))
    for name in dict.fromkeys(x["row"] for x in results):
        xs = [x for x in results if x["row"] == name]
        cells = []
        for k in keys:
            v = np.array([x[k] for x in xs], float)
            cells.append(f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else ""))
        print(f"{name:<28}" + "".join(f"{c:>20}" for c in cells))
    return results


if __name__ == "__main__":
    main()
