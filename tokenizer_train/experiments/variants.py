"""The runs ablate and the demo compare: variant names, the variants file and each run's config.

A variants file maps a name to dotted overrides; "include: FILE" (relative to the variants
file) first applies every leaf of that YAML file (configs/variants.yaml).
"""
from __future__ import annotations

from pathlib import Path

from tokenizer_train.common.config import Config, flatten, override_all, read_yaml
from motion_data.common.errors import SettingError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_VARIANTS = CONFIG_DIR / "variants.yaml"
BASELINE = "baseline"
FILTERED = "filtered_baseline"  # base.yaml with recommended.yaml's static filter (configs/variants.yaml)
RECOMMENDED = "recommended"


def load_variants(path: str | Path) -> dict[str, dict]:
    """``{name: {dotted key: value}}`` of a variants file, ``include:`` expanded."""
    path = Path(path)
    raw = read_yaml(path)
    out = {}
    for name, spec in raw.items():
        name = str(name)
        if name == BASELINE:
            raise SettingError(f"{path}: '{BASELINE}' is reserved (it is --config without overrides)")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise SettingError(f"{path}: variant name {name!r} must be letters, digits, '-' or '_'")
        spec = dict(spec or {})
        ov = {}
        inc = spec.pop("include", None)
        if inc is not None:
            ov.update(flatten(read_yaml(path.parent / inc)))
        ov.update(flatten(spec))
        out[name] = ov
    return out


def resolve(base_cfg: str | Path | None, overrides: dict, sets=(), epochs: int | None = None,
            seed: int | None = None) -> Config:
    """The config of one run: base file, then the variant's overrides, then ``sets`` (a mapping
    or ``(dotted key, value)`` pairs, every run alike), epochs, seed."""
    tree = read_yaml(Path(base_cfg)) if base_cfg else {}
    pairs = list(overrides.items()) + list(sets.items() if isinstance(sets, dict) else sets)
    if epochs is not None:
        pairs.append(("training.epochs", int(epochs)))
    if seed is not None:
        pairs.append(("training.seed", int(seed)))
    try:
        return override_all(tree, pairs)
    except SettingError as e:
        raise SettingError(f"{base_cfg or 'defaults'}: {e}") from None
