"""configs/amplify.yaml: AMPLIFY's motion tokenizer sizes on top of configs/recommended.yaml."""
from pathlib import Path

import torch

from tokenizer_train.common.config import load_config, to_dict
from tokenizer_train.model.model import MotionTokenizer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SIZE_KEYS = ("hidden_dim", "num_heads", "num_layers", "decoder_layers", "dropout", "mlp_ratio", "fsq_levels",
             "amplify_mlp_dim")


def test_amplify_config_is_recommended_at_amplify_sizes():
    amp, rec = load_config(CONFIGS / "amplify.yaml"), load_config(CONFIGS / "recommended.yaml")
    m = amp.model
    assert (m.hidden_dim, m.num_heads, m.num_layers, m.n_decoder_layers, m.dropout) == (768, 8, 2, 1, 0.1)
    assert m.fsq_levels == [8, 8, 6, 5] and m.amplify_mlp_dim == 256 and m.max_steps >= 15
    a, r = to_dict(amp), to_dict(rec)
    for k in SIZE_KEYS:  # apart from the sizes, the recommended settings exactly
        a["model"].pop(k), r["model"].pop(k)
    assert a == r


def test_amplify_config_builds_a_model_that_runs():
    cfg = load_config(CONFIGS / "amplify.yaml")
    model = MotionTokenizer(cfg.model, num_points=400, window_size=15).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"configs/amplify.yaml: {n:,} parameters (N=400, W=15)")
    assert 20e6 < n < 40e6
    with torch.no_grad():
        out = model(torch.zeros(1, 15, 400, 2), torch.full((1, 400, 2), 64.0))
    assert out["logits"].shape == (1, 15, 400, 225) and out["codes"].shape == (1, 15)
