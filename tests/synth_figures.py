"""Label figures of synthetic or tracked clips, computed from the library's definitions
(what test_synth and test_video check the generators against)."""
import numpy as np

from motion_data.common.labels import (DEFAULT_LABEL_RULE, DEFAULT_REF_SIZE, DEFAULT_W, center_class, labels_from_positions,
                                step_valid)
from conftest import point_stats
from motion_data.build.stats import keep_mask


def label_summary(pos_px: np.ndarray, vis: np.ndarray, metric: str = "p95", threshold: float = 0.04,
                  min_keep: int = 16, W: int = DEFAULT_W, ref_size: int = DEFAULT_REF_SIZE,
                  rule: str = DEFAULT_LABEL_RULE) -> dict:
    """Centre share of valid labels before and after a static filter, for clips
    ``pos_px`` ``(C, T, N, 2)`` (reference px) and ``vis`` ``(C, T, N)``, labels by ``rule``.

    Returns ``center_before``, ``center_after``, ``dynamic_point_ratio`` and label counts.
    """
    st = point_stats(pos_px, vis, W, ref_size, rule)
    keep = keep_mask(st[metric], st["valid_count"], threshold, min_keep)
    lab = labels_from_positions(np.asarray(pos_px, np.float32), W, ref_size, rule)
    valid = step_valid(np.asarray(vis, bool))
    centre = (lab == center_class(W)) & valid
    kept_valid = valid & keep[:, None, :]
    n_before, n_after = int(valid.sum()), int(kept_valid.sum())
    return {
        "clips": int(valid.shape[0]),
        "labels_before": n_before,
        "labels_after": n_after,
        "center_before": float(centre.sum() / n_before) if n_before else 0.0,
        "center_after": float((centre & keep[:, None, :]).sum() / n_after) if n_after else 0.0,
        "dynamic_point_ratio": float(keep.mean()) if keep.size else 0.0,
    }
