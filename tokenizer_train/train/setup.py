"""What a run is set up with: its loaders, its autocast context, its seeds."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from motion_data.common.errors import SettingError
from motion_data.common.storage import with_cache
from motion_data.common.workers import resolve_workers
from motion_data.read.loader import LoaderOptions, make_loader

from tokenizer_train.common.config import Config


def autocast_for(mode: str, device: torch.device):
    if mode == "no":
        return contextlib.nullcontext()
    if mode == "fp16" and device.type != "cuda":
        raise SettingError("training.mixed_precision fp16 needs CUDA (its GradScaler is CUDA-only); use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.float16 if mode == "fp16" else torch.bfloat16)


def make_loaders(data_dir, cfg: Config, rank: int, world_size: int, device: torch.device = torch.device("cpu")):
    """(train loader, val loader or None) of the build under the config's data section."""
    dc, tc, data_dir = cfg.data, cfg.training, with_cache(data_dir, cfg.data.cache_dir, cfg.data.cache_bytes)
    workers = resolve_workers(dc.num_workers, device.type)  # "auto" depends on the device
    opts = LoaderOptions(batch_size=tc.batch_size, seed=tc.seed, rank=rank, world_size=world_size,
                         num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    common = dict(static_filter=dc.static_filter, val_split=dc.val_split)
    train = make_loader(data_dir, opts, split="train", sampler=dc.sampler, augment=dc.augment, **common)
    val = make_loader(data_dir, opts, split="val", **common) if dc.val_split > 0 else None
    return train, val


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
