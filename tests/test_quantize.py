"""quantize.py beyond the int8 baseline: mixed bits and scale rules, GPTQ, LQER, compressors, the
code packer, size accounting, the budget planner and the CLI."""
import os
import subprocess
import sys

import pytest
import torch

from _util import ROOT

sys.path.insert(0, str(ROOT))
import quantize as q  # noqa: E402

MIXED = {"quant_scheme": "mixed"}


def gauss(rows, cols, seed=0, scale=1.0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale


def correlated(rows, cols, n=2048, seed=0):
    """A weight and a calibration Hessian from correlated inputs X = Z @ M (GPTQ's use case)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    X = torch.randn(n, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols))
    return w, X.T @ X / n


def rowq(w, cfg, hessians=None, name="blocks.0.mlp.fc.weight"):
    tensors, entries, report = q.quantize_state_dict({name: w}, {**MIXED, "quant_keep_float_numel": 0, **cfg}, hessians)
    return q.dequantize_state_dict(tensors, entries)[name], tensors, report[0]


def test_container_roundtrip_all_dtypes_and_empty():
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, dt in q.DTYPES.items():
        base = torch.randn(3, 5, generator=g) * 50
        tensors[name] = base > 0 if dt is torch.bool else base.to(dt)
        tensors[name + "_empty"] = torch.zeros(0, 4, dtype=dt)
    tensors["scalar"] = torch.tensor(3.25, dtype=torch.float64)
    tensors["empty1d"] = torch.zeros(0)
    back, header = q.unpack(q.pack(tensors, {"meta": {"a": 1}}))
    assert header == {"meta": {"a": 1}} and set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
@pytest.mark.parametrize("rule", ["max", "sdclip"])
def test_dequant_error_bound_per_bits(bits, rule):
    w = gauss(96, 1024, seed=bits) * torch.logspace(-4, 1, 96)[:, None]
    w[3] = 0.0  # an all-zero row must stay exact and finite
    deq, tensors, rec = rowq(w, {"quant_bits_mlp": bits, "quant_clip": rule, "sdclip_k_mlp": 4.0})
    r = 2 ** (bits - 1) - 1
    qt, s = tensors["blocks.0.mlp.fc.weight.q"], tensors["blocks.0.mlp.fc.weight.scale"]
    assert qt.dtype == torch.int8 and s.dtype == torch.float16 and int(qt.abs().max()) == r
    s = s.float()[:, None]
    err = (deq - w).abs()
    inside = w.abs() <= r * s  # not clipped by the clamp to [-r, r]
    assert (err[inside] <= s.expand_as(w)[inside] / 2 * (1 + 1e-6) + 1e-12).all()
    if rule == "max":
        assert inside.all()  # the fp16 step is rounded up: r * s still covers the row max
        ideal = w.abs().amax(1, keepdim=True) / r  # and it moves by at most one fp16 ulp
        assert ((s >= ideal) & (s - ideal <= ideal * 2.0**-10 + 2.0**-24)).all()
    else:
        assert (~inside).any()  # k=4 clips the tails: they land on the edge of the grid
        assert torch.allclose(deq[~inside].abs(), (r * s).expand_as(w)[~inside])
    assert torch.equal(deq[3], torch.zeros(1024)) and err.mean() > 0
    assert rec["bits"] == bits and rec["mse"] == pytest.approx(float(((deq - w).double() ** 2).mean()), rel=1e-6)


def test_int8_scheme_matches_hand_computation():
    w = torch.full((2, 40000), 0.1)
    w[0, :2] = 2.54  # the two largest |w| bracket the 99.99984th percentile: clip = 2.54
    w[0, 2] = 1.0
    w[1] = 0.003
    w[1, 0], w[1, 1] = 0.5, -0.5  # clip 0.5 < 1: the scale is floored at 1/127
    state = {"w": w, "vec": torch.linspace(-1, 1, 300), "blocks.0.q_gain": torch.linspace(0, 1, 8),
             "ids": torch.arange(4)}
    tensors, entries, report = q.quantize_state_dict(state, {})  # defaults: the official int8 scheme
    # fp16(2.54/127) = 1311 * 2^-16 and fp16(1/127) = 1032 * 2^-17, worked out by hand
    assert tensors["w.scale"].tolist() == [1311 * 2.0**-16, 1032 * 2.0**-17]
    qt = tensors["w.q"]
    assert qt[0, :4].tolist() == [127, 127, 50, 5] and qt[1, :3].tolist() == [64, -64, 0]
    assert tensors["vec"].dtype == torch.float16 and tensors["blocks.0.q_gain"].dtype == torch.float32
    assert torch.equal(tensors["ids"], state["ids"])
    assert {e["scheme"] for e in entries.values()} == {"int8_row", "float", "raw"}
    assert [r["method"] for r in report] == ["int8_row", "fp16", "fp32", "raw"]


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    w, H = correlated(64, 256)
    for clip in ("max", "sdclip"):
        cfg = {"quant_bits_mlp": 5, "quant_clip": clip}
        _, _, rtn = rowq(w, cfg, {"blocks.0.mlp.fc.weight": H})
        _, _, gq = rowq(w, {**cfg, "gptq": True, "gptq_block": 32}, {"blocks.0.mlp.fc.weight": H})
        assert rtn["method"] == "rtn" and gq["method"] == "gptq"
        assert gq["herr"] < 0.75 * rtn["herr"], (clip, gq["herr"], rtn["herr"])
        assert gq["mse"] > rtn["mse"]  # GPTQ trades weight-space error for output error


def test_gptq_dead_columns_act_order_and_fallback(capsys):
    w, H = correlated(32, 64)
    H[5, :], H[:, 5] = 0.0, 0.0  # an input that is never active
    s = q.candidate_scales(w, 6, "max")[0][0]
    qa, note = q.gptq_quantize(w, H, s, 6, act_order=True)
    qb, _ = q.gptq_quantize(w, H, s, 6, act_order=False)
    assert "dead_cols=1" in note and (qa[:, 5] == 0).all() and not torch.equal(qa, qb)
    e = lambda qq: q.hessian_error(w - qq.float() * s.float()[:, None], H)  # noqa: E731
    rtn = torch.clamp(torch.round(w / s.float()[:, None]), -31, 31)
    assert e(qa) < e(rtn) and e(qb) < e(rtn)
    v = torch.ones(64, 1) / 8
    indef = torch.eye(64) - 1000 * v @ v.T  # eigenvalue -999: no damping up to 10 x mean(diag) rescues it
    qf, note = q.gptq_quantize(w, indef, s, 6)
    assert "Cholesky failed" in note and torch.equal(qf.float(), rtn)
    qn, note = q.gptq_quantize(w, torch.full((64, 64), float("nan")), s, 6)
    assert "non-finite" in note and torch.equal(qn.float(), rtn)
    _, _, rec = rowq(w, {"gptq": True}, {"blocks.0.mlp.fc.weight": indef})
    assert rec["method"] == "rtn" and "Cholesky failed" in rec["note"] and "fallback" in capsys.readouterr().err
    _, _, rec = rowq(w, {"gptq": True}, {})
    assert rec["method"] == "rtn" and "no Hessian" in rec["note"]


def test_sdclip_k_trades_bytes_for_error():
    w = gauss(512, 512, seed=3)
    sizes, errs = [], []
    for k in (6.0, 9.0, 12.0, 16.0, 24.0):
        _, tensors, rec = rowq(w, {"quant_clip": "sdclip", "sdclip_k_mlp": k})
        sizes.append(len(q.compress(q.pack(tensors, {}), "zstd")))
        errs.append(rec["mse"])
    # larger k = coarser step: fewer bytes, more error; both strictly monotone
    assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes
    assert all(a < b for a, b in zip(errs, errs[1:])), errs
    assert sizes[0] > 1.3 * sizes[-1]


def test_gptq_lite_never_worse_than_row_max():
    torch.manual_seed(1)
    heavy = torch.distributions.StudentT(5.0).sample((64, 4096))  # wide heavy-tailed rows: clipping pays
    for w in (gauss(128, 512, seed=2), heavy):
        for bits in (5, 6, 8):
            _, _, lite = rowq(w, {"quant_clip": "gptq_lite", "quant_bits_mlp": bits})
            _, _, mx = rowq(w, {"quant_clip": "max", "quant_bits_mlp": bits})
            assert lite["mse"] <= mx["mse"] and lite["clip"].startswith("gptq_lite p=")
            if w is heavy and bits == 5:
                assert lite["mse"] < 0.8 * mx["mse"] and lite["clip"] != "gptq_lite p=1"


def test_lqer_reduces_error_of_top_matrices(tmp_path):
    g = torch.Generator().manual_seed(0)
    low = torch.randn(256, 4, generator=g) @ torch.randn(4, 512, generator=g)
    state = {"blocks.0.mlp.fc.weight": low + 0.3 * torch.randn(256, 512, generator=g),  # largest error
             "blocks.0.attn.c_q.weight": 0.1 * torch.randn(512, 512, generator=g),
             "blocks.1.attn.c_q.weight": 0.05 * torch.randn(512, 512, generator=g)}
    cfg = {**MIXED, "quant_bits_mlp": 5, "quant_bits_attn": 5, "quant_clip": "max"}
    _, _, plain = q.quantize_state_dict(state, cfg)
    tensors, entries, rep = q.quantize_state_dict(state, {**cfg, "lqer_rank": 4, "lqer_top_k": 2})
    by = {r["name"]: r for r in rep}
    base = {r["name"]: r for r in plain}
    fc, q0, q1 = by["blocks.0.mlp.fc.weight"], by["blocks.0.attn.c_q.weight"], by["blocks.1.attn.c_q.weight"]
    assert fc["lqer"] == 4 and entries["blocks.0.mlp.fc.weight"]["lqer"] == 4
    assert fc["mse"] < 0.95 * base["blocks.0.mlp.fc.weight"]["mse"] and fc["mse_before_lqer"] == base["blocks.0.mlp.fc.weight"]["mse"]
    assert q0["mse"] <= base["blocks.0.attn.c_q.weight"]["mse"]  # second by error: corrected or skipped
    assert "lqer" not in q1 and q1["mse"] == base["blocks.1.attn.c_q.weight"]["mse"]  # not in the top 2
    assert tensors["blocks.0.mlp.fc.weight.lqa"].shape == (256, 4) and tensors["blocks.0.mlp.fc.weight.lqb"].shape == (4, 512)
    assert int(tensors["blocks.0.mlp.fc.weight.lqb"].abs().max()) <= 7  # 4-bit factors
    path = tmp_path / "l.ptz"  # the correction survives the file round trip
    q.write_artifact(path, state, {**cfg, "lqer_rank": 4, "lqer_top_k": 2})
    back, _, _ = q.read_artifact(path)
    mine = q.dequantize_state_dict(tensors, entries)
    assert all(torch.equal(back[k], mine[k]) for k in state)
    assert float(((back["blocks.0.mlp.fc.weight"] - state["blocks.0.mlp.fc.weight"]) ** 2).mean()) == pytest.approx(fc["mse"], rel=1e-5)


@pytest.mark.parametrize("compressor", [c for c in q.COMPRESSORS if c != "pergroup"])  # pergroup reads containers only
@pytest.mark.parametrize("shuffle", [False, True])
def test_compressors_and_byte_shuffle_roundtrip(compressor, shuffle):
    g = torch.Generator().manual_seed(0)
    for data in (b"", b"x", bytes(range(256)) * 7 + b"odd", torch.randn(3001, generator=g).half().numpy().tobytes()[:-1]):
        pre = q.byte_shuffle(data) if shuffle else data
        assert len(pre) == len(data) and (q.byte_unshuffle(pre) if shuffle else pre) == data
        back = q.decompress(q.compress(pre, compressor), compressor)
        assert (q.byte_unshuffle(back) if shuffle else back) == data
    assert q.byte_shuffle(b"abcde") == b"acebd" and q.byte_unshuffle(b"acebd") == b"abcde"


def mixed_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"tok_emb.weight": torch.randn(1024, 128, generator=g) * 0.3,
            "blocks.0.attn.c_q.weight": torch.randn(256, 512, generator=g) * 0.05,
            "blocks.0.mlp.fc.weight": torch.randn(512, 256, generator=g).bfloat16(),
            "bigram.table.weight": torch.randn(700, 128, generator=g),
            "blocks.0.attn_scale": torch.rand(128, generator=g), "skip_weights": torch.rand(4, 128, generator=g),
            "blocks.0.q_gain": torch.rand(4, generator=g), "step": torch.tensor(7)}


@pytest.mark.parametrize("compressor,shuffle", [("zstd", True), ("brotli", False), ("lzma", True)])
def test_mixed_artifact_roundtrip_and_header(tmp_path, compressor, shuffle):
    state = mixed_state()
    cfg = {**MIXED, "quant_bits_attn": 5, "quant_bits_mlp": 6, "quant_bits_embed": 7, "quant_clip": "sdclip",
           "compressor": compressor, "byte_shuffle": shuffle, "model_dim": 128}
    path = tmp_path / "m.ptz"
    st = q.write_artifact(path, state, cfg)
    assert st["artifact_bytes"] == path.stat().st_size and st["byte_shuffle"] is shuffle
    back, config, header = q.read_artifact(path)
    assert config["model_dim"] == 128 and header["scheme"] == "mixed" and header["compressor"] == compressor
    assert header["byte_shuffle"] is shuffle and header["compressor_version"] == q.compressor_version(compressor)
    assert any(ch.isdigit() for ch in header["compressor_version"])
    assert (path.read_bytes()[8] & 1) == shuffle  # the flag read back needs no argument
    rep = {r["name"]: r for r in st["report"]}
    assert [rep[n]["bits"] for n in ("blocks.0.attn.c_q.weight", "blocks.0.mlp.fc.weight", "tok_emb.weight", "bigram.table.weight")] == [5, 6, 7, 8]
    assert rep["tok_emb.weight"]["clip"] == "sdclip k=14" and rep["bigram.table.weight"]["group"] == "other"
    for k, t in state.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
    assert torch.equal(back["blocks.0.attn_scale"], state["blocks.0.attn_scale"].half().float())  # control: fp16 like the records
    assert torch.equal(back["skip_weights"], state["skip_weights"].half().float())
    assert torch.equal(back["step"], state["step"])
    for n, r in (("blocks.0.attn.c_q.weight", 15), ("tok_emb.weight", 63)):
        step = (state[n].std(1, keepdim=True) * (13.0 if "attn" in n else 14.0) / r)
        assert ((back[n] - state[n]).abs() <= step * 0.5 * (1 + 2**-10) + 1e-7).float().mean() > 0.999


def test_hessian_accumulation():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 7, 16, generator=g), torch.randn(5, 16, generator=g)]
    H = {}
    for x in xs:
        q.accumulate_hessian(H, "blocks.0.attn.c_q.weight", x)
    out = q.finalize_hessians(H)
    X = torch.cat([xs[0].reshape(-1, 16), xs[1]])
    assert H["blocks.0.attn.c_q.weight"][1] == 19
    assert torch.allclose(out["blocks.0.attn.c_q.weight"], X.T @ X / 19, atol=1e-5)


def test_corrupt_or_truncated_mixed_artifact_is_an_artifact_error(tmp_path):
    path = tmp_path / "a.ptz"
    q.write_artifact(path, mixed_state(), {**MIXED, "compressor": "brotli", "byte_shuffle": True})
    blob = path.read_bytes()
    bad = tmp_path / "bad.ptz"
    cuts = [0, 3, 6, 8, 9, 10, 15, 22, 30, len(blob) // 2, len(blob) - 1]
    flips = [9, 12, 20, 40, len(blob) // 3, len(blob) - 5]
    for data in [blob[:n] for n in cuts] + [blob[:i] + bytes([blob[i] ^ 0x5A]) + blob[i + 1:] for i in flips]:
        bad.write_bytes(data)
        with pytest.raises(q.ArtifactError, match="truncated|corrupt|not a Parameter Golf|unknown compressor"):
            q.read_artifact(bad)


def test_reads_format_version_1(tmp_path):
    """Artifacts written before the flags byte existed still load."""
    tensors = {"x": torch.arange(6, dtype=torch.int16)}
    container = q.pack(tensors, {"config": {"a": 1}, "entries": {"x": {"scheme": "raw", "dtype": "int16"}}})
    body = q.compress(container, "zlib")
    import struct
    import zlib
    v1 = q.MAGIC + struct.pack("<HB", 1, 4) + b"zlib" + struct.pack("<IQ", zlib.crc32(body), len(container)) + body
    (tmp_path / "v1.ptz").write_bytes(v1)
    state, config, _ = q.read_artifact(tmp_path / "v1.ptz")
    assert config == {"a": 1} and torch.equal(state["x"], tensors["x"])


PROG = '''\
"""Module docstring that the packer drops."""
from __future__ import annotations

import sys  # a comment


def fib(n: int) -> int:
    """Docstring only plus code."""
    # comment inside
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def only_doc():
    """Nothing but a docstring."""


class Box:
    """A class docstring."""

    scale: float = 2.5

    def __init__(self, v):
        self.v = v  # trailing comment

    def get(self) -> float:
        """Method docstring."""
        return self.v * self.scale


TEXT = "keep # this literal" + """ and this multi-line
string value"""

if __name__ == "__main__":
    print(fib(15), Box(4).get(), only_doc(), TEXT, sys.argv[1:], __name__)
'''


def test_packer_output_runs_like_the_source(tmp_path):
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    (src_dir / "prog.py").write_text(PROG)
    packed = q.pack_code(PROG)
    assert packed == q.pack_code(PROG) and packed.count("\n") == 2  # deterministic, two lines
    assert packed.startswith("import lzma as L,base64 as B\nexec(L.decompress(B.b85decode(\"")
    out_dir.mkdir()
    (out_dir / "prog.py").write_text(packed)
    runs = [subprocess.run([sys.executable, str(d / "prog.py"), "a", "b"], capture_output=True, text=True, cwd=d) for d in (src_dir, out_dir)]
    assert runs[0].returncode == 0 and runs[1].returncode == 0, runs[1].stderr
    assert runs[0].stdout == runs[1].stdout and "610 10.0 None keep # this literal" in runs[0].stdout
    imp = "import prog; print(prog.fib(10), prog.Box(2).get(), prog.__doc__, prog.Box.get.__doc__, prog.TEXT[:4])"
    res = [subprocess.run([sys.executable, "-c", imp], capture_output=True, text=True, cwd=d) for d in (src_dir, out_dir)]
    assert res[1].returncode == 0 and res[1].stdout == "55 5.0 None None keep\n"
    assert res[0].stdout.startswith("55 5.0 Module docstring")
    import base64
    import lzma
    body = packed.split('"')[1]
    code = lzma.decompress(base64.b85decode(body), format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]).decode()
    assert "docstring" not in code.lower() and "comment" not in code and "keep # this literal" in code


def test_packed_quantize_is_importable_and_works(tmp_path):
    sizes = q.pack_files(ROOT, tmp_path)
    assert "quantize.py" in sizes and sizes["quantize.py"] < (ROOT / "quantize.py").stat().st_size / 2
    prog = ("import torch, quantize as q; w = torch.linspace(-1, 1, 4096).reshape(8, 512);"
            "t, e, r = q.quantize_state_dict({'a.mlp.w': w}, {'quant_scheme': 'mixed', 'quant_keep_float_numel': 0});"
            "print(q.dequantize_state_dict(t, e)['a.mlp.w'].sum().item(), r[0]['clip'])")
    env = {**os.environ, "PYTHONPATH": ""}
    outs = [subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, cwd=d, env=env) for d in (ROOT, tmp_path)]
    assert outs[1].returncode == 0, outs[1].stderr
    assert outs[0].stdout == outs[1].stdout and "gptq_lite" in outs[0].stdout


def test_size_accounting_equals_files_on_disk(tmp_path):
    for f in ("train_gpt.py", "quantize.py"):
        (tmp_path / f).write_text((ROOT / f).read_text())
    raw, detail = q.code_size(tmp_path)
    assert detail.startswith("raw ") and raw == sum((tmp_path / f).stat().st_size for f in ("train_gpt.py", "quantize.py"))
    packed, pdetail = q.code_size(tmp_path, packed=True)
    sizes = q.pack_files(tmp_path, tmp_path / "packed")
    assert pdetail.startswith("packed ") and packed == sum(sizes.values())
    assert packed == sum((tmp_path / "packed" / f).stat().st_size for f in sizes) and packed < raw / 2
    st = q.write_artifact(tmp_path / "a.ptz", mixed_state(), {**MIXED, "compressor": "zstd"})
    assert st["artifact_bytes"] == (tmp_path / "a.ptz").stat().st_size
    total = st["artifact_bytes"] + packed
    assert q.check_budget(total, record_mode=True) is None


def test_over_cap_detection():
    assert q.check_budget(16_000_000, record_mode=True) is None  # the cap itself is allowed
    warn = q.check_budget(16_000_001)
    assert warn.startswith("WARNING") and "over the 16,000,000-byte cap by 1 bytes" in warn
    with pytest.raises(ValueError, match="over the 16,000,000-byte cap by 1 bytes"):
        q.check_budget(16_000_001, record_mode=True)
    assert q.check_budget(16 * 2**20 - 1) is not None  # MiB are not MB


def test_bits_table_is_reproducible():
    fresh = q.measure_bits_table(shapes=((1024, 512),), bits=(6,), rules=("sdclip12", "max"), compressors=("zstd",))
    for rule in fresh:
        stored = q.BITS_TABLE[rule]["zstd"][1]
        assert abs(fresh[rule]["zstd"][0] - stored) <= 0.05 * stored, (rule, fresh[rule], stored)


def test_plan_estimates_real_artifact_bytes():
    g = torch.Generator().manual_seed(5)
    shapes = {"tok_emb.weight": (2048, 512), "blocks.0.mlp.fc.weight": (1024, 512), "blocks.0.mlp.proj.weight": (512, 1024),
              "blocks.0.attn.c_q.weight": (512, 512), "blocks.0.attn.c_k.weight": (256, 512), "blocks.0.attn_scale": (512,)}
    state = {k: torch.randn(*s, generator=g) * 0.02 for k, s in shapes.items()}
    cfg = {**MIXED, "quant_clip": "sdclip", "compressor": "brotli", "quant_bits_embed": 7}
    groups = q.param_groups_of(shapes, cfg)
    assert groups == {"embed": 2048 * 512, "mlp": 2 * 1024 * 512, "attn": 512 * 512 + 256 * 512, "float": 512}
    p = q.plan(groups, cfg, code_bytes=1000)
    blob, _ = q.build_artifact(state, {}, cfg)
    assert p["total"] == p["model_bytes"] + 1000 and p["margin"] == 16_000_000 - p["total"]
    assert abs(p["model_bytes"] - len(blob)) < 0.05 * len(blob), (p["model_bytes"], len(blob))
    assert "estimate (brotli)" in q.format_plan(p)
    assert q.plan(groups, {**cfg, "sdclip_k_mlp": 20.0}, 0)["model_bytes"] < p["model_bytes"]  # larger k, fewer bytes


def test_bad_settings_fail_with_one_clear_line():
    for cfg, msg in (({"quant_scheme": "int4"}, "quant_scheme='int4' is not one of int8, mixed"),
                     ({"quant_bits_mlp": 4}, "quant_bits_mlp=4 is not one of 5, 6, 7, 8"),
                     ({"quant_clip": "mean"}, "quant_clip='mean'"), ({"compressor": "gzip"}, "compressor='gzip' is not one of zlib")):
        with pytest.raises(ValueError, match=msg):
            q.quant_settings(cfg)
    with pytest.raises(ValueError, match="3-D tensors"):
        q.quantize_state_dict({"qo_bank": torch.zeros(4, 300, 300)}, MIXED)
    assert q.parse_setting("k_mlp=10") == ("sdclip_k_mlp", 10.0) and q.parse_setting("gptq=1") == ("gptq", True)
    assert q.parse_setting("clip=sdclip") == ("quant_clip", "sdclip") and q.parse_setting("rank=4") == ("lqer_rank", 4)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "quantize.py"), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_smoke(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"tok_emb.weight": torch.randn(512, 64, generator=g) * 0.1, "blocks.0.attn_scale": torch.ones(64)}
    for i in range(2):
        state[f"blocks.{i}.attn.c_q.weight"] = torch.randn(256, 384, generator=g) * 0.05
        state[f"blocks.{i}.mlp.fc.weight"] = torch.randn(512, 256, generator=g) * 0.05
    torch.save({"model": state, "config": {"quant_scheme": "int8", "compressor": "zstd", "model_dim": 64}, "step": 3}, tmp_path / "ckpt_step000003.pt")
    H = {k: correlated(1, v.shape[1], n=1024, seed=i)[1] for i, (k, v) in enumerate(state.items()) if ".attn." in k or ".mlp." in k}
    torch.save(H, tmp_path / "h.pt")
    (tmp_path / "c.toml").write_text('[artifact]\nquant_scheme = "mixed"\nquant_bits_mlp = 5\n[model]\nmodel_dim = 768\n')
    p = run_cli(tmp_path / "ckpt_step000003.pt", "--config", tmp_path / "c.toml", "--set", "clip=sdclip", "--set", "k_attn=10",
                "--hessians", tmp_path / "h.pt", "--out", tmp_path / "o.ptz", "--compare", "clip=max;clip=sdclip,k_mlp=10;clip=max,gptq=1", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "scheme:mixed" in out and "compressor:zstandard" in out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert lines["mlp"].split()[3] == "5" and "sdclip k=11.5" in lines["mlp"] and "sdclip k=10" in lines["attn"]
    assert lines["attn"].split()[-3] != "-"  # Hessian error column filled
    assert "code_bytes:" in out and "(raw " in out and "total:" in out
    state_back, config, header = q.read_artifact(tmp_path / "o.ptz")
    assert header["quant"]["quant_bits_mlp"] == 5 and config["model_dim"] == 64
    art = int(out.split("artifact_bytes:")[1].split()[0])
    assert art == (tmp_path / "o.ptz").stat().st_size
    cmp = {ln.split()[0]: ln.split() for ln in out.split("herr", 2)[-1].splitlines() if ln.strip()}
    assert set(cmp) == {"clip=max", "clip=sdclip,k_mlp=10", "clip=max,gptq=1"}
    assert float(cmp["clip=max,gptq=1"][-1]) < float(cmp["clip=max"][-1])  # GPTQ lowers the Hessian error
    # a raw final_model.pt with a 3-D tensor that has no rule: one clear error line
    torch.save({"odd": torch.zeros(2, 300, 300)}, tmp_path / "final_model.pt")
    p = run_cli(tmp_path / "final_model.pt", "--scheme", "mixed", cwd=tmp_path)
    assert p.returncode == 2 and "error: tensor odd has shape (2, 300, 300)" in p.stderr and "Traceback" not in p.stderr
    p = run_cli(tmp_path / "final_model.pt", "--set", "bogus=1", cwd=tmp_path)
    assert p.returncode == 2 and "unknown quant setting 'bogus'" in p.stderr
