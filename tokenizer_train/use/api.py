"""The Python API of a trained tokenizer: motion -> code ids -> predicted displacements.

    from tokenizer_train.use.api import load_tokenizer

    tok = load_tokenizer("runs/rec")            # RUN/best.pt, on CUDA when available, eval mode
    codes = tok.encode(positions)               # (B, T, N, 2) reference px -> (B, L) int64 code ids
    out = tok.decode(codes, start_pos=positions[:, 0])
    out.classes                                 # (B, T-1, N) predicted displacement class per point-step
    out.displacement                            # (B, T-1, N, 2) its (dx, dy) in reference px

Units (docs/DESIGN.md "Units"): positions are pixels of the ``ref_size x ref_size``
reference frame, (x, y) order; a step's velocity is ``p[t+1] - p[t]``, normalised by
``labels.normalize`` before the model sees it. L = (T-1) * model.groups tokens per clip,
step-major, as ``python -m tokenizer_train tokenize`` writes them. ``start_pos`` (each
point's position at the first frame) is needed only by runs with ``model.point_pos_enc``
(``tok.needs_start_pos``). Inputs may be numpy arrays or torch tensors, batched or one
clip (then the outputs have no batch axis either).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from motion_data.common.errors import DataError, UserError
from motion_data.common.labels import class_offsets, normalize, velocities

from tokenizer_train.model.checkpoint import load_model
from tokenizer_train.common.distributed import pick_device
from motion_data.read.clips import read_clips


@dataclass
class Decoded:
    """What the decoder predicts for every (step, point): ``classes`` ``(B, S, N)`` int64 (argmax
    of the W*W displacement classes), ``displacement`` ``(B, S, N, 2)`` float32 (dx, dy) of that
    class in reference px, ``confidence`` ``(B, S, N)`` float32 (its softmax probability) and
    ``logits`` ``(B, S, N, W*W)`` float32. Tensors on the tokenizer's device."""

    classes: torch.Tensor
    displacement: torch.Tensor
    confidence: torch.Tensor
    logits: torch.Tensor

    @classmethod
    def of_logits(cls, z: torch.Tensor, offsets: torch.Tensor, logits: bool = True) -> Decoded:
        """The prediction of float32 logits ``z``; ``offsets`` ``(W*W, 2)``: each class's (dx, dy)."""
        top, classes = z.max(-1)
        prob = torch.exp(top - torch.logsumexp(z, -1))  # the softmax probability of the argmax class
        return cls(classes, offsets[classes], prob, z if logits else None)

    def first(self) -> Decoded:
        """The first clip's prediction, without the batch axis."""
        return Decoded(*(None if x is None else x[0] for x in (self.classes, self.displacement, self.confidence,
                                                               self.logits)))


def _tensor(x, device, dtype) -> torch.Tensor:
    t = x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
    return t.to(device=device, dtype=dtype)


def _batched(x, device, dtype, clip_ndim: int) -> tuple[torch.Tensor, bool]:
    """``x`` as a tensor with a batch axis, and whether it came as one clip (``clip_ndim`` axes)."""
    t = _tensor(x, device, dtype)
    one = t.ndim == clip_ndim
    return (t[None] if one else t), one


def _positions_in(x, N: int, device) -> tuple[torch.Tensor, bool]:
    """``encode``'s ``positions`` as ``(B, T, N, 2)`` float32, and whether they were one clip."""
    p, one = _batched(x, device, torch.float32, 3)
    if p.ndim != 4 or p.shape[-2:] != (N, 2) or p.shape[1] < 2:
        raise ValueError(f"positions must be (B, T, N, 2) or (T, N, 2) reference px with N = {N} "
                         f"points (this run's) and T >= 2 frames, got {tuple(p.shape)}")
    return p, one


def _velocities_in(x, N: int, device) -> tuple[torch.Tensor, bool]:
    """``encode``'s ``velocities_norm`` as ``(B, S, N, 2)`` float32, and whether they were one clip."""
    v, one = _batched(x, device, torch.float32, 3)
    if v.ndim != 4 or v.shape[-2:] != (N, 2):
        raise ValueError(f"velocities_norm must be (B, T-1, N, 2) or (T-1, N, 2) with N = {N} points "
                         f"(this run's), got {tuple(v.shape)}")
    return v, one


class Tokenizer:
    """A trained motion tokenizer in eval mode (build it with :func:`load_tokenizer`).

    Attributes: ``model`` (``MotionTokenizer``), ``config`` (the run's ``Config``), ``device``,
    ``W`` (window: W*W classes), ``N`` (points per clip), ``T`` (frames per clip it was trained
    on), ``levels`` (FSQ levels), ``codebook_size``, ``tokens_per_step`` and ``needs_start_pos``.
    """

    def __init__(self, model, config, meta: dict, device: torch.device):
        self.model, self.config, self.device = model, config, device
        self.W, self.N, self.T = int(meta["W"]), int(meta["N"]), meta.get("T")
        self.levels = list(model.levels)
        self.codebook_size = int(model.codebook_size)
        self.tokens_per_step = int(model.tokens_per_step)
        self.needs_start_pos = bool(config.model.point_pos_enc.enabled)
        self._offsets = torch.from_numpy(class_offsets(self.W)).to(device)

    def __repr__(self):
        return (f"Tokenizer(W={self.W}, N={self.N}, levels={self.levels}, codebook_size={self.codebook_size}, "
                f"device={self.device})")

    def _start(self, start_pos, B: int, one: bool):
        if start_pos is None:
            if self.needs_start_pos:
                raise ValueError("this run uses model.point_pos_enc: pass start_pos, each point's (x, y) "
                                 "reference px at the first frame, (B, N, 2) or (N, 2)")
            return None
        s = _tensor(start_pos, self.device, torch.float32)
        return s[None] if one else s

    @torch.inference_mode()
    def encode(self, positions=None, *, velocities_norm=None, start_pos=None) -> torch.Tensor:
        """Code ids ``(B, L)`` int64 (``(L,)`` for one clip) of clips given as

        - ``positions`` ``(B, T, N, 2)`` or ``(T, N, 2)`` reference px (start positions taken
          from frame 0), or
        - ``velocities_norm`` ``(B, T-1, N, 2)`` normalised velocities (``labels.normalize``
          of ``p[t+1] - p[t]``, what the loader's ``batch["velocities"]`` holds) and, for
          runs with ``needs_start_pos``, ``start_pos`` ``(B, N, 2)`` reference px.

        Example: ``tok.encode(batch["positions"])`` equals ``tokenize``'s codes of those clips.
        """
        if (positions is None) == (velocities_norm is None):
            raise ValueError("pass exactly one of positions or velocities_norm")
        if positions is not None:
            p, one = _positions_in(positions, self.N, self.device)
            v = normalize(velocities(p), self.W)
            start = p[:, 0] if start_pos is None else self._start(start_pos, len(p), one)
            if not self.needs_start_pos:
                start = None
        else:
            v, one = _velocities_in(velocities_norm, self.N, self.device)
            start = self._start(start_pos, len(v), one)
        codes = self.model.encode(v, start)["codes"]
        return codes[0] if one else codes

    @torch.inference_mode()
    def codes_to_quantized(self, codes) -> torch.Tensor:
        """``(B, L)`` code ids -> the FSQ values ``(B, L, len(levels))`` the decoder reads."""
        c = _tensor(codes, self.device, torch.long)
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.codebook_size):
            raise ValueError(f"code ids must be in [0, {self.codebook_size}), got {int(c.min())}..{int(c.max())}")
        return self.model.fsq.indices_to_codes(c)

    @torch.inference_mode()
    def decode(self, codes, start_pos=None, logits: bool = True) -> Decoded:
        """The decoder's prediction (:class:`Decoded`) for code ids ``(B, L)`` or ``(L,)``.

        ``start_pos`` ``(B, N, 2)`` reference px is needed when ``needs_start_pos``. The
        classes equal the argmax of the model's own forward logits on the clips the codes
        came from. Example: ``tok.decode(tok.encode(pos), pos[:, 0]).displacement``.
        ``logits=False`` leaves ``logits`` None and holds one ``(B, T-1, N, W*W)`` tensor fewer.
        """
        c, one = _batched(codes, self.device, torch.long, 1)
        if c.ndim != 2 or c.shape[1] % self.tokens_per_step:
            raise ValueError(f"codes must be (B, L) with L a multiple of {self.tokens_per_step} tokens per step, "
                             f"got {tuple(c.shape)}")
        z = self.model.decode(self.codes_to_quantized(c), self._start(start_pos, len(c), one)).float()
        out = Decoded.of_logits(z, self._offsets, logits)
        return out.first() if one else out


def load_clips(build_dir, split: str = "val", val_split: float | None = 0.1, limit: int | None = None) -> dict:
    """The clips of a build's split as arrays for ``encode``/``decode``: ``positions``
    ``(C, T, N, 2)`` float32 reference px, ``visibility`` ``(C, T, N)``, ``clip_id`` (C,).
    ``split``: ``train``, ``val`` (the trainer's split under ``val_split``: pass the run's
    ``tok.config.data.val_split``) or ``all``; ``limit``: the first clips only."""
    from motion_data.build.folder import BuildDir
    from motion_data.read.split import split_manifest

    b = BuildDir(build_dir)
    if split == "all":
        rows = np.arange(b.n_clips)
    elif split in ("train", "val"):
        tr, va = split_manifest(b.manifest(["split_group", "start_frame"]), val_split or 0.0, b.T)
        rows = tr if split == "train" else va
    else:
        raise ValueError(f"split must be train, val or all, got {split!r}")
    rows = rows[:limit] if limit is not None else rows
    pos, vis, _ = read_clips(b, rows)
    ids = b.manifest(["clip_id"])["clip_id"]
    return {"positions": pos, "visibility": vis, "clip_id": [ids[r] for r in rows]}


def load_tokenizer(run_dir, checkpoint: str = "best", device: str | torch.device = "auto") -> Tokenizer:
    """The tokenizer of a training run folder, in eval mode.

    ``checkpoint``: ``best`` (RUN/best.pt) or ``last``; ``device``: ``auto`` (CUDA when
    available), ``cpu``, ``cuda`` or a ``torch.device``. A missing or unreadable checkpoint is
    a ``DataError`` naming the file.

        tok = load_tokenizer("runs/rec", device="cpu")
        codes = tok.encode(positions)  # (B, T, N, 2) reference px
    """
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be best or last, got {checkpoint!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no CUDA device is available; use device auto or cpu")
    dev = device if isinstance(device, torch.device) else pick_device(device)
    path = Path(run_dir) / f"{checkpoint}.pt"
    try:
        model, cfg, meta = load_model(run_dir, checkpoint, dev)
    except FileNotFoundError:
        raise DataError(f"{path}: no checkpoint (is {run_dir} a training run folder? "
                              f"train one with python -m tokenizer_train train, or use the other checkpoint)") from None
    return Tokenizer(model, cfg, meta, dev)
