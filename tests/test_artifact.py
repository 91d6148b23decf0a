"""The minimal artifact path: int8 per-row quantization, safe container, compression, code bytes."""
import struct
import sys

import pytest
import torch

from _util import ROOT

sys.path.insert(0, str(ROOT))
import quantize as q  # noqa: E402
import train_gpt as tg  # noqa: E402


def small_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(300, 257, generator=g) * 0.05,  # quantized per row
        "wide": torch.randn(2, 40000, generator=g) * 3.0,  # quantized; rows with |w| > 1 use clip/127
        "vec": torch.randn(300, generator=g),  # small: stored as fp16
        "blocks.0.attn_scale": torch.randn(64, generator=g),  # control name: stored as fp32
        "bank": torch.randn(3, 150, 200, generator=g),  # 3-D and large: per-tensor scale
        "steps": torch.arange(5, dtype=torch.int64),  # non-float passthrough
        "bf": torch.randn(70000, generator=g).bfloat16(),
    }


def test_container_roundtrip_is_exact():
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(7, dtype=torch.int16), "c": torch.zeros(0),
               "d": torch.randn(5).bfloat16(), "e": torch.tensor(True), "f": torch.randint(-128, 127, (9,), dtype=torch.int8)}
    back, header = q.unpack(q.pack(tensors, {"x": [1, 2]}))
    assert header["x"] == [1, 2] and set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t)


def test_int8_row_error_bound():
    w = torch.randn(64, 512) * torch.logspace(-3, 1, 64)[:, None]
    qt, scale = q.quantize_rows_int8(w)
    deq = qt.float() * scale.float()[:, None]
    clip = torch.quantile(w.abs(), q.INT8_CLIP_Q, dim=1)
    inside = w.abs() <= clip[:, None]
    err = (deq - w).abs()
    # half a grid step, plus the fp16 rounding of the stored scale (relative 2^-11) times |w|
    bound = scale.float()[:, None] / 2 + w.abs() * 2.0**-11 + 1e-7
    assert (err[inside] <= bound[inside]).all()
    assert err.mean() > 0  # really quantized
    # the baseline's 1/127 floor: rows with |w| < 1 share one grid step
    small_rows = clip < 1
    assert torch.allclose(scale.float()[small_rows], torch.tensor(1 / 127), rtol=1e-3)


@pytest.mark.parametrize("compressor", ["zlib", "lzma", "zstd", "brotli"])
def test_artifact_roundtrip(tmp_path, compressor):
    pytest.importorskip({"zstd": "zstandard", "brotli": "brotli"}.get(compressor, "zlib"))
    state = small_state()
    path = tmp_path / "a.ptz"
    st = q.write_artifact(path, state, {"model_dim": 64}, compressor=compressor, control_patterns="attn_scale")
    assert st["artifact_bytes"] == path.stat().st_size
    back, config, header = q.read_artifact(path)
    assert config == {"model_dim": 64} and header["scheme"] == "int8"
    assert set(back) == set(state)
    for k, t in state.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
    assert torch.equal(back["steps"], state["steps"])
    assert torch.equal(back["blocks.0.attn_scale"], state["blocks.0.attn_scale"])  # fp32 control tensor
    assert torch.equal(back["vec"], state["vec"].half().float())
    assert ((back["big"] - state["big"]).abs() <= 0.5 / 127 + state["big"].abs() * 2.0**-11 + 1e-7).all()
    assert (back["wide"] - state["wide"]).abs().max() < 0.1
    bank_err, step = (back["bank"] - state["bank"]).abs(), state["bank"].abs().max() / 127
    assert (bank_err <= step / 2 + 1e-6).float().mean() > 0.9999  # all but the few clipped outliers


def test_corrupt_and_truncated_artifacts(tmp_path):
    path = tmp_path / "a.ptz"
    q.write_artifact(path, small_state(), {})
    blob = path.read_bytes()
    cases = {
        "flip": blob[:-100] + bytes([blob[-100] ^ 0xFF]) + blob[-99:],
        "trunc": blob[: len(blob) // 2],
        "header": blob[:9],
        "magic": b"PK\x03\x04" + blob[4:],
        "version": blob[:6] + struct.pack("<H", 99) + blob[8:],
    }
    needles = {"flip": "corrupt", "trunc": "corrupt or truncated", "header": "truncated",
               "magic": "not a Parameter Golf artifact", "version": "format version 99"}
    for name, data in cases.items():
        p = tmp_path / f"{name}.ptz"
        p.write_bytes(data)
        with pytest.raises(q.ArtifactError, match=needles[name]):
            q.read_artifact(p)
    with pytest.raises(q.ArtifactError, match="not found"):
        q.read_artifact(tmp_path / "missing.ptz")


def test_model_roundtrip_through_artifact(tmp_path):
    cfg, _ = tg.load_config(None, {"num_layers": "2", "model_dim": "64", "num_heads": "2", "num_kv_heads": "1"}, {})
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    for p in model.parameters():  # non-trivial weights (proj layers start at zero)
        p.data.add_(torch.randn_like(p) * 0.02)
    q.write_artifact(tmp_path / "m.ptz", model.state_dict(), {}, control_patterns=cfg.control_tensor_name_patterns)
    state, _, _ = q.read_artifact(tmp_path / "m.ptz")
    fresh = tg.GPT(cfg)
    fresh.load_state_dict(state, strict=True)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    a, b = model(x, x).item(), fresh(x, x).item()
    assert a != b and abs(a - b) < 0.05  # quantized, so close but not identical


def test_code_size_counts_the_files_on_disk(tmp_path):
    (tmp_path / "train_gpt.py").write_text("print('hi')\n")
    (tmp_path / "quantize.py").write_bytes("# \u00e9\n".encode())
    total, detail = q.code_size(tmp_path)
    assert total == 12 + 5 and "train_gpt.py:12" in detail and "ttt_eval.py" not in detail
    real, _ = q.code_size(ROOT)
    assert real == sum((ROOT / f).stat().st_size for f in q.CODE_FILES if (ROOT / f).exists())
