"""The one config schema: YAML -> nested dataclasses, with ``--set a.b=value`` overrides.

Every key of ``configs/base.yaml`` is a field here; an unknown key anywhere is an error that
names its full path (``training.focal.gama``). Every mitigation switch defaults to off, so
a plain config is the baseline (docs/DESIGN.md "Config keys").
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from motion_data.read.augment import AugmentConfig
from motion_data.read.sampler import SamplerConfig
from motion_data.common.static_filter import StaticFilter
from motion_data.common.errors import SettingError


def _one_of(name: str, value, allowed):
    if value not in allowed:
        raise SettingError(f"{name} must be one of {list(allowed)}, got {value!r}")


# ----------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    static_filter: StaticFilter = field(default_factory=StaticFilter)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    val_split: float = 0.1  # share of clips held out (whole sources, else time blocks)
    window_size: int = 15  # W; must match the build's stats.zarr attribute
    num_workers: int | str = "auto"  # loader worker processes, or auto (motion_data.common.workers)
    cache_dir: str | None = None  # node-local cache of whole remote shards (motion_data.read.shard_cache)
    cache_bytes: int | None = None  # its bound

    def __post_init__(self):
        if self.num_workers != "auto" and (isinstance(self.num_workers, (bool, str)) or self.num_workers < 0):
            raise SettingError(f"data.num_workers must be an integer >= 0 or auto, got {self.num_workers!r}")
        if not 0.0 <= self.val_split < 1.0:
            raise SettingError(f"data.val_split must be in [0, 1), got {self.val_split}")
        if self.window_size < 3 or self.window_size % 2 == 0:
            raise SettingError(f"data.window_size must be an odd number >= 3, got {self.window_size}")


# ---------------------------------------------------------------------------- model
@dataclass
class TanhScaleConfig:
    """``model.quant_input_tanh_scale``: ``tanh(s * x)`` with s clamped to [s_min, s_max]."""

    enabled: bool = False
    init: float = 1.0
    s_min: float = 0.5
    s_max: float = 3.0
    trainable: bool = True

    def __post_init__(self):
        if not 0 < self.s_min <= self.init <= self.s_max:
            raise SettingError(f"model.quant_input_tanh_scale needs 0 < s_min <= init <= s_max, "
                              f"got s_min={self.s_min} init={self.init} s_max={self.s_max}")


@dataclass
class PointPosEncConfig:
    """``model.point_pos_enc``: 2D Fourier features of each point's start position (needs ``start_pos``)."""

    enabled: bool = False
    num_freqs: int = 6  # frequencies 1, 2, 4, ... per coordinate of start_pos / ref_size

    def __post_init__(self):
        if self.num_freqs < 1:
            raise SettingError(f"model.point_pos_enc.num_freqs must be >= 1, got {self.num_freqs}")


@dataclass
class PointEncoderConfig:
    """``model.point_encoder``: one MLP shared by all points before the step projection."""

    enabled: bool = False
    dim: int = 16  # per-point feature size (the MLP's hidden layer is 4x this)

    def __post_init__(self):
        if self.dim < 1:
            raise SettingError(f"model.point_encoder.dim must be >= 1, got {self.dim}")


@dataclass
class ModelConfig:
    hidden_dim: int = 128
    num_layers: int = 2  # encoder layers
    decoder_layers: typing.Optional[int] = None  # None: same as num_layers
    num_heads: int = 4
    dropout: float = 0.0
    mlp_ratio: int = 4
    max_steps: int = 64  # length of the learned time embedding (>= T-1)
    fsq_levels: list = field(default_factory=lambda: [8, 8, 6, 5])
    quant_input_norm: str = "none"
    quant_input_tanh_scale: TanhScaleConfig = field(default_factory=TanhScaleConfig)
    quant_input_noise_std: float = 0.0
    decoder: str = "additive"  # additive | code_query | amplify (tokenizer_train/model/decoder_heads.py)
    point_pos_enc: PointPosEncConfig = field(default_factory=PointPosEncConfig)
    point_encoder: PointEncoderConfig = field(default_factory=PointEncoderConfig)
    groups: int = 1  # tokens per step: points split by index into this many groups
    amplify_mlp_dim: int = 256  # hidden width of the amplify decoder's residual MLP

    def __post_init__(self):
        _one_of("model.quant_input_norm", self.quant_input_norm, ("none", "layernorm", "rmsnorm"))
        _one_of("model.decoder", self.decoder, ("additive", "code_query", "amplify"))
        if self.groups < 1:
            raise SettingError(f"model.groups must be >= 1, got {self.groups}")
        if self.amplify_mlp_dim < 1:
            raise SettingError(f"model.amplify_mlp_dim must be >= 1, got {self.amplify_mlp_dim}")
        if self.hidden_dim % self.num_heads:
            raise SettingError(f"model.hidden_dim ({self.hidden_dim}) must be divisible by model.num_heads ({self.num_heads})")
        if not self.fsq_levels or any(int(v) < 2 for v in self.fsq_levels):
            raise SettingError(f"model.fsq_levels must be a non-empty list of ints >= 2, got {self.fsq_levels}")
        self.fsq_levels = [int(v) for v in self.fsq_levels]
        if self.quant_input_noise_std < 0:
            raise SettingError("model.quant_input_noise_std must be >= 0")

    @property
    def n_decoder_layers(self) -> int:
        return self.num_layers if self.decoder_layers is None else self.decoder_layers


# ------------------------------------------------------------------------- training
@dataclass
class ClassWeightingConfig:
    """``training.class_weighting``: per-class CE weights (see tokenizer_train/train/class_weights.py)."""

    method: str = "none"  # none | balanced | ring_decay
    center_gamma: float = 1.0  # extra factor on the centre class weight
    min_weight: float = 0.0
    max_weight: float = 1.0e9
    power: float = 1.0
    full_weight_ring: int = 2

    def __post_init__(self):
        _one_of("training.class_weighting.method", self.method, ("none", "balanced", "ring_decay"))


@dataclass
class FocalConfig:
    enabled: bool = False
    gamma: float = 2.0
    alpha: typing.Union[None, float, str] = None  # None | float | "per_class"

    def __post_init__(self):
        if isinstance(self.alpha, str) and self.alpha != "per_class":
            raise SettingError(f"training.focal.alpha must be null, a number or 'per_class', got {self.alpha!r}")
        if self.gamma < 0:
            raise SettingError("training.focal.gamma must be >= 0")


@dataclass
class LRScheduleConfig:
    type: str = "none"  # none | cosine | step
    warmup_steps: int = 0
    min_lr: float = 0.0
    step_size: int = 1000  # optimizer steps between decays (type: step)
    gamma: float = 0.5  # decay factor (type: step)

    def __post_init__(self):
        _one_of("training.lr_schedule.type", self.type, ("none", "cosine", "step"))
        if self.type == "step" and int(self.step_size) < 1:
            raise SettingError(f"training.lr_schedule.step_size must be >= 1, got {self.step_size}")


@dataclass
class TrainingConfig:
    batch_size: int = 32
    learning_rate: float = 3.0e-4
    weight_decay: float = 0.01
    epochs: int = 10
    seed: int = 0
    gradient_accumulation_steps: int = 1
    log_interval: int = 10
    code_log_interval: typing.Optional[int] = None  # None: log_interval
    mixed_precision: str = "no"  # no | fp16 | bf16
    device: str = "auto"  # auto | cpu | cuda
    clip_grad_norm: float = 0.0  # 0: off
    save_interval: int = 0  # optimizer steps between mid-epoch 'last' checkpoints; 0: epoch ends only
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    code_entropy_weight: float = 0.0
    code_entropy_warmup_epochs: float = 0.0
    code_entropy_type: str = "entropy"  # entropy | kl_uniform
    code_entropy_temperature: float = 0.1
    # LFQ / MAGVIT-v2 form (docs/DESIGN.md Trainer): weight of each token's own assignment entropy
    # (pushed down) relative to the average's entropy (pushed up); 0: the average alone
    code_entropy_token_weight: float = 1.0
    # tokens the average code distribution is estimated over (running estimate when a batch
    # holds fewer); None: 4 * codebook size; 0: the batch alone
    code_entropy_avg_tokens: typing.Optional[int] = None
    class_weighting: ClassWeightingConfig = field(default_factory=ClassWeightingConfig)
    focal: FocalConfig = field(default_factory=FocalConfig)
    logit_adjustment: float = 0.0  # tau of tokenizer_train/train/prior.py; 0: off
    # masked: the decoder computes logits only for the entries the loss or the evaluation mask
    # scores, the loss in chunks (fused_ce); all: every entry's logits (the earlier path, the
    # same results within float tolerance; for comparison)
    decode_points: str = "masked"

    def __post_init__(self):
        # YAML 1.1 reads a bare `no` as False
        if self.mixed_precision is False:
            self.mixed_precision = "no"
        _one_of("training.mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        _one_of("training.device", self.device, ("auto", "cpu", "cuda"))
        _one_of("training.code_entropy_type", self.code_entropy_type, ("entropy", "kl_uniform"))
        _one_of("training.decode_points", self.decode_points, ("masked", "all"))
        for k in ("batch_size", "epochs", "gradient_accumulation_steps", "log_interval"):
            if getattr(self, k) < 1:
                raise SettingError(f"training.{k} must be >= 1, got {getattr(self, k)}")
        if self.code_log_interval is not None and self.code_log_interval < 1:
            raise SettingError("training.code_log_interval must be >= 1 or null")
        if self.code_entropy_temperature <= 0:
            raise SettingError("training.code_entropy_temperature must be > 0")
        if self.code_entropy_token_weight < 0:
            raise SettingError("training.code_entropy_token_weight must be >= 0")
        if self.code_entropy_avg_tokens is not None and self.code_entropy_avg_tokens < 0:
            raise SettingError("training.code_entropy_avg_tokens must be >= 0 or null")

    @property
    def code_interval(self) -> int:
        return self.code_log_interval or self.log_interval


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)


# --------------------------------------------------------------------------- loading
def _check_scalar(path: str, hint, value):
    """Light type check: numbers stay numbers, bools stay bools, strings stay strings."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_scalar(path, a, value)
            except SettingError as e:
                errs.append(str(e))
        raise SettingError(f"{path}: {value!r} does not match {hint}")
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot, no sign) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingError(f"{path} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingError(f"{path} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise SettingError(f"{path} must be true or false, got {value!r}")
        return value
    if hint is str:
        if value is False and path.endswith("mixed_precision"):
            return "no"
        if not isinstance(value, str):
            raise SettingError(f"{path} must be a string, got {value!r}")
        return value
    if hint is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise SettingError(f"{path} must be a list, got {value!r}")
        return list(value)
    return value


def _build(cls, data: dict, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingError(f"{path or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise SettingError(f"unknown config key {full!r}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, full)
        else:
            kwargs[key] = _check_scalar(full, hint, value)
    try:
        return cls(**kwargs)
    except SettingError:
        raise
    except (ValueError, TypeError) as e:
        raise SettingError(f"{path}: {e}") from None


to_dict = dataclasses.asdict  # a Config as its nested YAML mapping


def _set_path(tree: dict, dotted: str, value):
    parts = dotted.split(".")
    node = tree
    cls = Config
    for i, p in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}
        if p not in names:
            raise SettingError(f"unknown config key {'.'.join(parts[:i + 1])!r} in --set {dotted}=...")
        hint = typing.get_type_hints(cls)[p]
        if i == len(parts) - 1:
            node[p] = value
            return
        if not dataclasses.is_dataclass(hint):
            raise SettingError(f"config key {'.'.join(parts[:i + 1])!r} is not a section (in --set {dotted}=...)")
        node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else node[p]
        cls = hint


def parse_override(text: str) -> tuple[str, object]:
    """``"a.b=value"`` -> ("a.b", YAML-parsed value)."""
    if "=" not in text:
        raise SettingError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise SettingError(f"--set {key}: cannot parse value {raw!r} ({e})") from None
    return key.strip(), value


def override_all(cfg, pairs) -> Config:
    """A new validated Config: ``cfg`` (a Config or its YAML mapping) with ``(dotted key,
    value)`` pairs (or a mapping) set in order, e.g. ``override_all(cfg, {"training.epochs":
    5})``, validated once at the end; an unknown key is a SettingError."""
    tree = to_dict(cfg) if isinstance(cfg, Config) else copy.deepcopy(cfg or {})
    for key, value in (pairs.items() if isinstance(pairs, dict) else pairs):
        _set_path(tree, key, value)
    return _build(Config, tree, "")


def from_dict(data: dict | None, overrides: typing.Sequence[str] = ()) -> Config:
    """A Config from a YAML mapping and ``--set KEY=VALUE`` strings (the command line's form)."""
    return override_all(data, [parse_override(text) for text in overrides])


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from ``path``; unreadable, invalid or non-mapping files are a
    SettingError naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise SettingError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SettingError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise SettingError(f"{path}: expected a mapping at the top level")
    return data


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (None: all defaults) and apply ``--set`` overrides."""
    data = read_yaml(path) if path is not None else {}
    try:
        return from_dict(data, overrides)
    except SettingError as e:
        raise SettingError(f"{path}: {e}" if path else str(e)) from None


def add_set_argument(p, help: str = "override a config key"):
    """The ``--set KEY=VALUE ...`` option of every command that takes overrides: several pairs
    after one --set, and --set repeatable; ``args.set`` is the list of all pairs in order."""
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"{help}, e.g. --set training.epochs=5 model.hidden_dim=64 (several pairs after "
                        f"one --set, and --set may repeat; the value is parsed as YAML; an unknown key is an error)")


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are leaves)."""
    out = {}
    for k, v in (tree or {}).items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
