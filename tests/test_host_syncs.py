"""No host sync on a training step that logs nothing (issue 13, item 1).

Every way the trainer's own code can pull a tensor's value to the host (``.item()``,
``.tolist()``, ``.numpy()``, ``.cpu()``, ``float()``, ``int()``, ``bool()``,
``np.asarray``) is counted while a step runs, from the first micro-batch's forward to
the end of its optimizer step; steps that log nothing must count zero. Calls made inside
torch itself (e.g. AdamW reading its CPU step counter) are not the trainer's and are not
counted; on a GPU, ``torch.cuda.set_sync_debug_mode`` also sees syncs inside kernels.
"""
import sys
from pathlib import Path

import pytest
import torch

from tokenizer_train.train import trainer as T
from tokenizer_train.common.config import from_dict

sys.path.insert(0, str(Path(__file__).parent))
from loader_fixtures import write_build  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# the trainer's code; the loader (motion_data) assembles batches on the host by design
PROJECT = (str(REPO / "tokenizer_train"),)
SYNCS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__", "__array__")


def _record_syncs(monkeypatch, events):
    for name in SYNCS:
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=orig, _name=name, **k):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PROJECT):  # the project's own call, not torch's
                events.append(("sync", _name, f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"))
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)


def _mark(monkeypatch, events):
    fb, opt = T.Trainer.forward_backward, T.Trainer.optimizer_step

    def forward_backward(self, *a, **k):
        events.append(("micro",))
        return fb(self, *a, **k)

    def optimizer_step(self):
        out = opt(self)
        events.append(("step",))
        return out

    monkeypatch.setattr(T.Trainer, "forward_backward", forward_backward)
    monkeypatch.setattr(T.Trainer, "optimizer_step", optimizer_step)


def _syncs_per_step(events) -> list[list]:
    """The syncs of each optimizer step, from its first micro-batch to its optimizer step."""
    steps, current, open_ = [], [], False
    for e in events:
        if e[0] == "micro" and not open_:
            current, open_ = [], True
        elif e[0] == "sync" and open_:
            current.append(e[1:])
        elif e[0] == "step":
            steps.append(current)
            open_ = False
    return steps


@pytest.mark.parametrize("extra", [
    {},  # the baseline config
    {"training": {"gradient_accumulation_steps": 2, "code_entropy_weight": 0.1, "log_interval": 2,
                  "code_log_interval": 4,
                  "clip_grad_norm": 1.0, "focal": {"enabled": True, "gamma": 2.0}},
     "model": {"quant_input_noise_std": 0.05, "quant_input_tanh_scale": {"enabled": True}}},
])
def test_no_host_sync_on_steps_that_log_nothing(tmp_path, monkeypatch, extra):
    build = write_build(tmp_path / "build", shard_sizes=(16, 16, 16))
    tr = {"batch_size": 4, "epochs": 1, "log_interval": 3, "device": "cpu", **extra.get("training", {})}
    cfg = from_dict({"model": {"hidden_dim": 16, "num_layers": 1, "num_heads": 2, **extra.get("model", {})},
                     "training": tr, "data": {"val_split": 0.0}})
    events = []
    _record_syncs(monkeypatch, events)
    _mark(monkeypatch, events)
    T.train(cfg, build, tmp_path / "run", progress=False)
    steps = _syncs_per_step(events)
    log, code = cfg.training.log_interval, cfg.training.code_interval
    quiet = {k: s for k, s in enumerate(steps, 1) if k % log and k % code}
    assert len(steps) >= 6 and len(quiet) >= 3
    assert {k: s for k, s in quiet.items() if s} == {}, "host syncs on steps that log nothing"
    # the counter works: the logging between steps reads values on the host
    assert sum(e[0] == "sync" for e in events) > 0
