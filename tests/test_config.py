"""Config schema: base.yaml == defaults, unknown keys name their path, --set overrides."""
from pathlib import Path

import pytest
import yaml

from tokenizer_train.common.config import Config, from_dict, load_config
from motion_data.common.errors import SettingError

BASE = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"


def test_base_yaml_is_the_default_config():
    assert load_config(BASE) == Config()


def test_base_yaml_documents_every_key():
    for line in BASE.read_text().splitlines():
        s = line.strip()
        if s and not s.startswith("#") and ":" in s:
            assert "#" in s, f"undocumented key in base.yaml: {s}"


def _keys(d, prefix=""):
    for k, v in d.items():
        yield prefix + k
        if isinstance(v, dict):
            yield from _keys(v, prefix + k + ".")


def test_base_yaml_lists_every_field():
    import dataclasses
    listed = set(_keys(yaml.safe_load(BASE.read_text())))
    schema = set(_keys(dataclasses.asdict(Config())))
    assert listed == schema


@pytest.mark.parametrize("tree, path", [
    ({"training": {"focal": {"gama": 1}}}, "training.focal.gama"),
    ({"model": {"hidden": 3}}, "model.hidden"),
    ({"data": {"static_filter": {"treshold": 0.1}}}, "data.static_filter.treshold"),
    ({"optim": {}}, "optim"),
])
def test_unknown_key_names_full_path(tree, path):
    with pytest.raises(SettingError, match=f"'{path}'"):
        from_dict(tree)


def test_unknown_key_in_file_names_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  lr_schedule:\n    typ: cosine\n")
    with pytest.raises(SettingError, match=r"c\.yaml.*training\.lr_schedule\.typ"):
        load_config(p)


def test_set_overrides_and_types():
    c = from_dict({"training": {"epochs": 3}}, [
        "training.epochs=5", "model.fsq_levels=[8,8,8,4]", "training.learning_rate=1e-3",
        "training.focal.alpha=per_class", "data.static_filter.enable=true",
        "training.mixed_precision=bf16", "training.code_log_interval=null"])
    assert c.training.epochs == 5
    assert c.model.fsq_levels == [8, 8, 8, 4]
    assert c.training.learning_rate == pytest.approx(1e-3)
    assert c.training.focal.alpha == "per_class"
    assert c.data.static_filter.enable is True
    assert c.training.mixed_precision == "bf16"
    assert c.training.code_interval == c.training.log_interval


def test_set_unknown_key_and_bad_values():
    with pytest.raises(SettingError, match="training.focal.gama"):
        from_dict({}, ["training.focal.gama=1"])
    with pytest.raises(SettingError, match="not a section"):
        from_dict({}, ["training.epochs.x=1"])
    with pytest.raises(SettingError, match="KEY=VALUE"):
        from_dict({}, ["training.epochs"])
    with pytest.raises(SettingError, match="integer"):
        from_dict({}, ["training.batch_size=2.5"])
    with pytest.raises(SettingError, match="mixed_precision"):
        from_dict({}, ["training.mixed_precision=fp8"])
    with pytest.raises(SettingError, match="metric"):
        from_dict({}, ["data.static_filter.metric=median"])


def test_yaml_no_is_mixed_precision_no():
    assert from_dict({"training": {"mixed_precision": False}}).training.mixed_precision == "no"
    assert from_dict({}, ["training.mixed_precision=no"]).training.mixed_precision == "no"


def test_override_takes_values_and_returns_a_new_validated_config():
    from tokenizer_train.common.config import override_all

    base = from_dict({})
    c = override_all(base, [("training.epochs", 5)])
    assert c.training.epochs == 5 and base.training.epochs != 5  # the original is untouched
    c = override_all({"model": {"hidden_dim": 32}}, [("model.fsq_levels", [8, 5]), ("data.static_filter.enable", True)])
    assert c.model.hidden_dim == 32 and c.model.fsq_levels == [8, 5] and c.data.static_filter.enable
    with pytest.raises(SettingError, match="unknown config key 'training.epoch'"):
        override_all(base, [("training.epoch", 5)])
    with pytest.raises(SettingError, match="window_size"):  # validated like a YAML file
        override_all(base, [("data.window_size", 4)])
