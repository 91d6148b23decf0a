"""bench/bench.py runs on CPU at a tiny shape (so CI exercises it); FLOPs per token by hand."""
import sys

import pytest

from _util import ROOT

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402
import train_gpt as tg  # noqa: E402


def test_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "b.json"
    res = bench.main(["--config", str(ROOT / "configs/pr1812.toml"), "--steps", "2", "--warmup", "1", "--batch-tokens", "256",
                      "--seq-len", "64", "--model_dim=64", "--num_heads=4", "--num_kv_heads=2", "--vocab_size=128",
                      "--rope_dims=8", "--virtual_world_size=1", "--autocast_dtype=fp32", "--eval-batches", "1", "--out", str(out)])
    assert out.is_file() and res["looping"] is True and res["device"] == "cpu" and res["mfu"] is None
    assert res["ms_per_step"] > 0 and res["tok_s"] == pytest.approx(256 / (res["ms_per_step"] / 1000), rel=0.01)
    assert res["eval_tok_s"] > 0 and res["params"] > 0


@pytest.mark.parametrize("looping,passes", [(False, 11), (True, 17)])
def test_flops_per_token_by_hand(looping, passes):
    cfg, _ = tg.load_config(str(ROOT / "configs/pr1812.toml"), {}, {})
    d, kv, hid, V, T = 512, 256, 2048, 8192, 2048
    per_pass = 2 * d * d + 2 * kv * d + 2 * hid * d  # Q, O, K, V, up, down
    want = 6 * (passes * per_pass + V * d) + 6 * passes * T * d
    assert tg.flops_per_token(cfg, tg.GPT(cfg), looping) == want
