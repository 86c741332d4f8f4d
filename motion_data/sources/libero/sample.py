"""The LIBERO sample shipped with the package: ground-truth tracks of a few dozen scripted
rollouts (made by ``render-libero``, command and seed in ``data/libero_sample.json``) in a
compact file that unpacks to ordinary track files, every label identical to the rendered
tracks'.

Compact form (``pack``): positions in fixed point at 1/512 px, each value moved by one step
where plain rounding would change ``round(clip(p, 0, ref - 1))`` (the only thing AMPLIFY's
label rule reads, docs/DESIGN.md), stored as differences along each window's frames (a static
point's are 0) and compressed; visibility bit-packed; a few RGB frames (at the start of
windows the demo draws) as PNG. float16 positions would change about 9 % of the non-centre
labels. The velocity label rule (``round(p[t+1] - p[t])``) is not guaranteed unchanged.
"""
from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np

from motion_data.common.errors import DataError
from motion_data.common.labels import quantize_positions

SCALE = 512  # fixed point: 1/512 px
SAMPLE = Path(__file__).resolve().parent / "data" / "libero_sample.npz"
SAMPLE_INFO = SAMPLE.with_suffix(".json")

def to_fixed(p: np.ndarray, ref_size: int) -> np.ndarray:
    """int32 ``round(p * 512)``, nudged by one unit wherever that would change the label position."""
    p = np.asarray(p, np.float32)
    q = np.rint(p.astype(np.float64) * SCALE).astype(np.int64)
    want = quantize_positions(p, ref_size)
    for _ in range(2):
        bad = quantize_positions((q / SCALE).astype(np.float32), ref_size) != want
        if not bad.any():
            break
        # the value lies within 1/1024 px of a rounding boundary: step to its side of it
        q[bad] += np.where(p[bad] > q[bad] / SCALE, 1, -1)
    if (quantize_positions((q / SCALE).astype(np.float32), ref_size) != want).any():
        raise AssertionError("fixed point changed a label position")  # cannot happen: one step always suffices
    return q.astype(np.int32)


def from_fixed(q: np.ndarray) -> np.ndarray:
    return (np.asarray(q, np.int64) / SCALE).astype(np.float32)


def pack(track_files, out: Path, info: dict, frames_per_rollout: int = 2) -> dict:
    """Write the compact sample of rendered ``track_files`` (render-libero output with
    ``--frames``) to ``out`` (.npz) and ``info`` (render command, seed) beside it (.json)."""
    arrays, index = {}, []
    for f in sorted(map(Path, track_files)):
        with np.load(f, allow_pickle=False) as z:
            tracks, vis, start = z["tracks"], z["visibility"], z["start_frame"]
            size = [int(x) for x in z["image_size"]]
            frames = z["frames"] if "frames" in z.files else None
        name = f.stem
        ref = max(size)
        q = to_fixed(tracks, ref)  # (B, T, N, 2)
        d = np.diff(q, axis=1, prepend=np.zeros_like(q[:, :1]))
        dt = np.int16 if np.abs(d).max() < 2 ** 15 else np.int32
        arrays[f"{name}/delta"] = d.astype(dt)
        arrays[f"{name}/vis"] = np.packbits(vis.astype(bool).reshape(-1))
        arrays[f"{name}/start_frame"] = np.asarray(start, np.int32)
        picked = []
        if frames is not None and frames_per_rollout:
            # windows spread over the rollout (not its first: the arm has barely moved)
            for w in np.linspace(len(start) // 3, len(start) - 1, frames_per_rollout).astype(int):
                fr = int(start[w])
                arrays[f"{name}/frame{fr}"] = _png(frames[fr])
                picked.append(fr)
        index.append({"name": name, "shape": list(tracks.shape), "image_size": size, "frames": picked,
                      "labels_crc32": labels_crc(tracks, vis, ref)})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays, index=np.frombuffer(json.dumps(index).encode(), np.uint8))
    tmp.replace(out)
    out.with_suffix(".json").write_text(json.dumps({**info, "rollouts": len(index)}, indent=1) + "\n")
    return {"rollouts": len(index), "bytes": out.stat().st_size}


def labels_crc(tracks, vis, ref_size: int) -> int:
    """CRC-32 of a rollout's AMPLIFY-rule labels (W = 15) and valid steps: recorded at pack
    time from the rendered float32 tracks, checked against the unpacked ones by the tests."""

    from motion_data.common.labels import labels_from_positions, step_valid

    lab = labels_from_positions(np.asarray(tracks, np.float32), 15, ref_size=ref_size).astype(np.int16)
    return zlib.crc32(step_valid(np.asarray(vis, bool)).tobytes(), zlib.crc32(lab.tobytes()))


def _png(rgb: np.ndarray) -> np.ndarray:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.reshape(-1)


def index(path: Path | None = None) -> list[dict]:
    """The sample's table of rollouts: name, shape, image_size, frames, labels_crc32."""
    path = Path(path or SAMPLE)
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(z["index"].tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: cannot read the LIBERO sample ({e}); reinstall the package "
                          f"(pip install -e .) or pass --data synthetic") from None


def read(path: Path | None = None):
    """Yield ``(name, tracks (B,T,N,2) float32 px, visibility (B,T,N) bool, start_frame,
    image_size, {frame index: PNG bytes})`` of every rollout of the sample."""
    path = Path(path or SAMPLE)
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read the LIBERO sample ({e}); reinstall the package "
                          f"(pip install -e .) or pass --data synthetic") from None
    with z:
        try:
            index = json.loads(z["index"].tobytes().decode())
            for r in index:
                n, shape = r["name"], tuple(r["shape"])
                q = np.cumsum(z[f"{n}/delta"].astype(np.int64), axis=1)
                vis = np.unpackbits(z[f"{n}/vis"])[:int(np.prod(shape[:3]))].reshape(shape[:3]).astype(bool)
                frames = {int(fr): z[f"{n}/frame{fr}"].tobytes() for fr in r["frames"]}
                yield n, from_fixed(q), vis, z[f"{n}/start_frame"].astype(np.int64), r["image_size"], frames
        except (KeyError, ValueError, EOFError, json.JSONDecodeError, zipfile.BadZipFile, zlib.error) as e:
            raise DataError(f"{path}: damaged LIBERO sample ({e}); reinstall the package") from None


def unpack(out_dir: Path, path: Path | None = None) -> list[Path]:
    """Write the sample as ordinary track files ``OUT/<rollout>.npz`` (what build-shards reads)
    and its frames as ``OUT/frames/<rollout>_f<frame>.png``; returns the track files."""
    out_dir = Path(out_dir)
    (out_dir / "frames").mkdir(parents=True, exist_ok=True)
    files = []
    for name, tracks, vis, start, size, frames in read(path):
        f = out_dir / f"{name}.npz"
        tmp = out_dir / f".{name}.tmp.npz"
        np.savez(tmp, tracks=tracks, visibility=vis, start_frame=start, image_size=np.asarray(size, np.int64))
        tmp.replace(f)
        for fr, png in frames.items():
            (out_dir / "frames" / f"{name}_f{fr:04d}.png").write_bytes(png)
        files.append(f)
    return files
