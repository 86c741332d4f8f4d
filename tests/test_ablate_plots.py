"""ablate's plots: distinguishable lines with a legend per panel; a 1-epoch ablation plots without warnings."""
import warnings

import pytest

from tokenizer_train.experiments import ablate_plots as P

VARIANTS = ("baseline", "recommended", "entropy")


def one_epoch_rows(k: int) -> list[dict]:
    """metrics.jsonl rows of a 1-epoch run: three step logs, one validation epoch, code usage."""
    rows = [{"step": s, "epoch": 0, "train/entropy_norm_step": 0.1 * s + k, "train/unique_codes_step": 3 + s}
            for s in (1, 2, 3)]
    rows.append({"step": 3, "epoch": 0, "val/code_info_bits_epoch": 0.1 * k, "val/acc_epoch": 0.6,
                 "val/acc_noncenter_epoch": 0.1 * k, "val/code_usage_hist": [50, 30, 0, 20]})
    return rows


def test_one_epoch_plots_have_markers_legends_and_no_warnings(tmp_path):
    rows = {v: one_epoch_rows(k) for k, v in enumerate(VARIANTS)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "no artists with labels", singular limits, ...
        fig = P.curves_figure(rows, P.ACCURACY_PANELS)
        written = P.plot_all(tmp_path, {(v, 0): r for v, r in rows.items()}, list(VARIANTS), 0)
    assert [p.name for p in written] == ["code_usage.png", "entropy.png", "accuracy.png"]
    assert all(p.stat().st_size > 5000 for p in written)
    assert len(fig.axes) == 3
    for ax in fig.axes:  # every panel: a line per variant, each a visible single point, a legend of all
        assert len(ax.lines) == 3 and all(len(line.get_xdata()) == 1 for line in ax.lines)
        assert all(line.get_marker() not in (None, "", "None") for line in ax.lines)
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(VARIANTS)
        looks = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in ax.lines}
        assert len(looks) == 3
    base, rec = fig.axes[0].lines[:2]  # baseline and recommended differ in colour, dash and marker
    assert base.get_color() != rec.get_color() and base.get_linestyle() != rec.get_linestyle()
    assert base.get_marker() != rec.get_marker()


def test_panel_without_data_says_so_and_has_no_legend():
    rows = {"baseline": [{"step": 1, "epoch": 0, "val/acc_epoch": 0.5}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = P.curves_figure(rows, P.ACCURACY_PANELS)
    info, acc, _ = fig.axes
    assert not info.lines and info.get_legend() is None and "not logged" in [t.get_text() for t in info.texts]
    assert len(acc.lines) == 1 and acc.get_legend() is not None


@pytest.mark.parametrize("n", [1, 4, 9])
def test_code_usage_is_readable(n):
    rows = {f"v{i}": one_epoch_rows(i) for i in range(n)}
    fig = P.usage_figure(rows, 0)
    w, h = fig.get_size_inches()
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == n
    assert w / min(n, 3) >= 5 and h >= 3.9  # at least 5 x 3.9 inches a panel
    assert all(ax.title.get_fontsize() >= 12 and ax.xaxis.label.get_fontsize() >= 11 for ax in panels)
