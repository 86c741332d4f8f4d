"""BuildDir, the one reader of a build folder: attributes, manifest, compatibility, and one
clear error line (file and way out) for each way a folder can be wrong."""
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from motion_data.build.folder import BuildDir
from motion_data.common.errors import DataError
from motion_data.common.static_filter import DEFAULT_FILTER, StaticFilter

sys.path.insert(0, str(Path(__file__).parent))
from loader_fixtures import write_build  # noqa: E402


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return write_build(tmp_path_factory.mktemp("bd") / "build", shard_sizes=(5, 3), n_points=16, T=16)


def test_attributes_and_manifest(build):
    b = BuildDir(build)
    assert (b.W, b.N, b.T, b.S, b.n_clips, b.ref_size) == (15, 16, 16, 15, 8, 128)
    assert b.label_rule == "amplify" and b.build_filter == DEFAULT_FILTER
    assert b.info() == {"W": 15, "T": 16, "N": 16, "n_clips": 8, "ref_size": 128, "label_rule": "amplify",
                        "build_filter": DEFAULT_FILTER}
    man = b.manifest(["clip_id", "shard"])
    assert set(man) == {"clip_id", "shard"} and man["clip_id"] == pq.read_table(build / "manifest.parquet").column(
        "clip_id").to_pylist()
    assert np.array_equal(b.per_clip("valid_count", slice(2, 4)), np.asarray(zarr.open_group(
        str(build / "stats.zarr"), mode="r")["stats/valid_count"][2:4]))


def test_check_compatible_names_what_differs(build):
    b = BuildDir(build)
    b.check_compatible(W=15, N=16, T=16, what="the run R")  # equal: no error
    b.check_compatible()  # nothing asked: nothing checked
    with pytest.raises(DataError, match=r"build has N=16 but the run R has N=400"):
        b.check_compatible(W=15, N=400, what="the run R")
    with pytest.raises(ValueError, match=str(build)):  # a ValueError, naming the folder
        b.check_compatible(W=13)


def test_missing_folder_is_one_line_with_the_way_out(tmp_path):
    with pytest.raises(DataError) as e:
        BuildDir(tmp_path / "nothing").W
    msg = str(e.value)
    assert "stats.zarr: not found" in msg and "build-shards" in msg and "\n" not in msg


def test_old_format_and_short_manifest_are_refused(build, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(build, old)
    g = zarr.open_group(str(old / "stats.zarr"), mode="a")
    g.attrs["format_version"] = 1
    with pytest.raises(DataError, match="rebuild it with `python -m preprocess build-shards`"):
        BuildDir(old).N
    short = tmp_path / "short"
    shutil.copytree(build, short)
    t = pq.read_table(short / "manifest.parquet")
    pq.write_table(t.slice(0, 5), short / "manifest.parquet")
    with pytest.raises(DataError, match=r"manifest\.parquet: 5 rows but .*stats\.zarr holds 8 clips"):
        BuildDir(short).manifest()


def test_histograms_missing_is_named(build):
    # this fixture's store has no class histograms: class counts say so, naming the store
    with pytest.raises(DataError, match=r"stats\.zarr: no class histograms for metric 'p95'"):
        BuildDir(build).class_counts(StaticFilter(enable=True))
