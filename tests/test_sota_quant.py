"""The PR #1855 quantization and artifact pieces (spec sota-1855 3.4-3.6): LQER asymmetric, int8 attention gates,
the fp16 passthrough rule, int7 embeddings, the per-group compressor (exact round trip, L1 row chain, corruption)."""
import struct
import sys
import zlib

import numpy as np
import pytest
import torch

from _util import ROOT

sys.path.insert(0, str(ROOT))
import pergroup as pg  # noqa: E402
import quantize as q  # noqa: E402

MIXED = {"quant_scheme": "mixed", "quant_clip": "max"}


def gauss(rows, cols, seed=0, scale=1.0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale


def quant(state, **cfg):
    return q.quantize_state_dict(state, {**MIXED, **cfg})


# --- LQER asym (3.4) ----------------------------------------------------------------------------------------------

def test_lqer_asym_matches_the_spec_by_hand():
    w, name = gauss(16, 128), "blocks.0.mlp.fc.weight"
    t0, _, _ = quant({name: w}, quant_keep_float_numel=0)
    t, entries, rep = quant({name: w}, quant_keep_float_numel=0, lqer_rank=4, lqer_top_k=1, lqer_mode="asym")
    E = w - t0[name + ".q"].float() * t0[name + ".scale"].float()[:, None]
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    A, B = U[:, :4] * S[:4], Vh[:4]
    sA = torch.tensor(A.abs().max().item() / 1.5).half()
    qA = [[max(-2, min(1, round(A[i, j].item() / sA.item()))) for j in range(4)] for i in range(16)]
    flat, sg, qB = B.reshape(-1).tolist(), [], []
    for g in range(len(flat) // 64):  # groups of 64 consecutive values of row-major B
        s = float(torch.tensor(max(abs(x) for x in flat[64 * g : 64 * g + 64]) / 7.5).half())
        sg.append(s)
        qB += [max(-8, min(7, round(x / s))) for x in flat[64 * g : 64 * g + 64]]
    assert torch.equal(t[name + ".lqa"], torch.tensor(qA, dtype=torch.int8)) and t[name + ".lqa"].max() <= 1
    assert t[name + ".lqas"].dtype == torch.float16 and t[name + ".lqas"].dim() == 0 and t[name + ".lqas"] == sA
    assert torch.equal(t[name + ".lqb"], torch.tensor(qB, dtype=torch.int8).reshape(4, 128))
    assert torch.equal(t[name + ".lqbs"], torch.tensor(sg, dtype=torch.float16)) and t[name + ".lqbs"].shape == (8,)
    corr = (torch.tensor(qA).float() * sA.float()) @ (torch.tensor(qB).float().reshape(8, 64) * torch.tensor(sg)[:, None]).reshape(4, 128)
    want = t0[name + ".q"].float() * t0[name + ".scale"].float()[:, None] + corr
    got = q.dequantize_state_dict(t, entries)[name]
    assert torch.allclose(got, want, atol=1e-6) and rep[0]["lqer"] == 4 and (got - w).square().sum() < E.square().sum()


def test_lqer_asym_falls_back_to_per_row_factors_when_b_has_no_groups_of_64():
    name = "blocks.0.mlp.fc.weight"
    t, entries, _ = quant({name: gauss(16, 40)}, quant_keep_float_numel=0, lqer_rank=4, lqer_mode="asym", lqer_bits=4)
    assert t[name + ".lqas"].shape == (16,) and t[name + ".lqbs"].shape == (4,) and t[name + ".lqb"].abs().max() <= 7


def test_lqer_asym_picks_the_top_k_by_error_norm_not_hessian_error():
    # scales 1, 4, 2, 3: |E|_F follows them; the Hessians make the large matrix's output error tiny
    state = {f"blocks.{i}.mlp.fc.weight": gauss(32, 64, seed=i, scale=s) for i, s in enumerate((1.0, 4.0, 2.0, 3.0))}
    H = {k: torch.eye(64) * (1e-6 if k.startswith("blocks.1.") else 1.0) for k in state}
    cfg = {**MIXED, "quant_keep_float_numel": 0, "lqer_rank": 2, "lqer_top_k": 2}

    def picked(mode, h=None):
        return {r["name"] for r in q.quantize_state_dict(state, {**cfg, "lqer_mode": mode}, h)[2] if r.get("lqer")}
    assert picked("asym") == picked("asym", H) == {"blocks.1.mlp.fc.weight", "blocks.3.mlp.fc.weight"}
    assert "blocks.1.mlp.fc.weight" not in picked("sym", H)  # sym ranks by the Hessian (output) error when it has one


# --- gates, passthrough, int7 (3.3, 3.5) ---------------------------------------------------------------------------

def test_attn_gate_int8_per_row_before_the_passthrough_rule():
    w = gauss(8, 12, scale=0.3)
    w[3] = 0.0  # the sparse gate starts at zero: a zero row must stay finite
    state = {"blocks.0.attn.attn_gate_w": w, "blocks.0.attn.small_gate_w": gauss(4, 4), "blocks.1.attn.attn_gate_w": gauss(4, 4)}
    t, entries, rep = quant(state, quant_gate_int8=True)
    qg, s = t["blocks.0.attn.attn_gate_w.q"], t["blocks.0.attn.attn_gate_w.scale"]
    assert qg.dtype == torch.int8 and s.dtype == torch.float16 and entries["blocks.0.attn.attn_gate_w"]["scheme"] == "int8_row"
    want_s = (w.abs().amax(1) / 127).half()
    assert torch.equal(s[want_s > 0], want_s[want_s > 0]) and qg.abs().max() == 127
    assert torch.equal(qg, torch.clamp(torch.round(w / s.float()[:, None]), -127, 127).to(torch.int8))
    back = q.dequantize_state_dict(t, entries)
    assert torch.isfinite(back["blocks.0.attn.attn_gate_w"]).all() and back["blocks.0.attn.attn_gate_w"][3].abs().max() == 0
    assert (back["blocks.0.attn.attn_gate_w"] - w).abs().max() <= s.float().max() / 2 + 1e-7
    # 16 values (< 32) and the flag off: fp16 passthrough
    assert {r["name"]: r["method"] for r in rep}["blocks.1.attn.attn_gate_w"] == "fp16"
    assert {r["name"]: r["method"] for r in quant(state)[2]}["blocks.0.attn.attn_gate_w"] == "fp16"


def test_fp16_passthrough_rule_of_the_mixed_scheme():
    state = {"blocks.0.q_gain": torch.randn(8), "blocks.0.resid_mix": torch.randn(2, 512), "big.weight": gauss(256, 256),
             "edge.weight": gauss(256, 257), "steps": torch.arange(5)}
    t, entries, rep = quant(state, quant_bits_other=6)
    m = {r["name"]: r["method"] for r in rep}
    assert m == {"blocks.0.q_gain": "fp16", "blocks.0.resid_mix": "fp16", "big.weight": "fp16", "edge.weight": "rtn", "steps": "raw"}
    assert t["big.weight"].dtype == torch.float16 and torch.equal(t["steps"], state["steps"])
    back = q.dequantize_state_dict(t, entries)
    assert back["blocks.0.q_gain"].dtype == torch.float32 and torch.equal(back["blocks.0.q_gain"], state["blocks.0.q_gain"].half().float())


def test_int7_embedding():
    t, entries, rep = quant({"tok_emb.weight": gauss(64, 32)}, quant_keep_float_numel=0, quant_bits_embed=7)
    assert rep[0]["bits"] == 7 and t["tok_emb.weight.q"].abs().max() == 63 and entries["tok_emb.weight"]["bits"] == 7


# --- per-group compression (3.6) ------------------------------------------------------------------------------------

def brute_chain(m):
    m, order = m.astype(np.int64), [0]
    left = list(range(1, len(m)))
    while left:
        d = [np.abs(m[j] - m[order[-1]]).sum() for j in left]
        order.append(left.pop(int(np.argmin(d))))  # argmin: first of equal distances = lowest index
    return order


def test_l1_chain_hand_example_and_ties_to_lowest_index():
    rows = np.array([[0, 0], [5, 5], [1, 0], [0, 1], [1, 1], [0, 1]], dtype=np.int8)
    # from 0: rows 2, 3, 5 tie at 1 -> 2; from 2: row 4 (1); from 4: rows 3, 5 tie at 1 -> 3; then 5 (0); then 1
    assert pg.l1_chain(rows).tolist() == [0, 2, 4, 3, 5, 1]
    rng = np.random.default_rng(0)
    for hi in (3, 63, 127):  # 127: the int16 path (int8 differences would overflow)
        m = rng.integers(-hi, hi + 1, size=(40, 6)).astype(np.int8)
        assert pg.l1_chain(m).tolist() == brute_chain(m)


def role_state():
    g = torch.Generator().manual_seed(1)
    st = {"tok_emb.weight": torch.randn(96, 64, generator=g)}
    for i in range(2):
        for part, shape in (("attn.c_q", (64, 64)), ("attn.c_k", (32, 64)), ("attn.c_v", (32, 64)), ("attn.proj", (64, 64)),
                            ("mlp.fc", (128, 64)), ("mlp.proj", (64, 128))):
            st[f"blocks.{i}.{part}.weight"] = torch.randn(*shape, generator=g)
        st[f"blocks.{i}.attn.attn_gate_w"] = torch.randn(4, 12, generator=g)
        st[f"blocks.{i}.q_gain"] = torch.randn(4, generator=g)
    return st


def split(body):
    n = struct.unpack_from("<I", body, 4)[0]
    lens = struct.unpack_from(f"<{n}I", body, 8)
    cuts = np.cumsum((8 + 4 * n, *lens)).tolist()
    return [body[a:b] for a, b in zip(cuts, cuts[1:])]


@pytest.mark.parametrize("backend,level", [("zpaq", 3), ("ppmd", 6)])
def test_pergroup_round_trip_is_exact(tmp_path, backend, level):
    pytest.importorskip("pyppmd" if backend == "ppmd" else "zpaq")
    cfg = {**MIXED, "quant_keep_float_numel": 100, "quant_gate_int8": True, "lqer_rank": 4, "lqer_mode": "asym"}
    paths = {}
    for comp in ("pergroup", "brotli"):
        paths[comp] = tmp_path / f"{comp}.ptz"
        q.write_artifact(paths[comp], role_state(), {**cfg, "compressor": comp, "pergroup_backend": backend, "pergroup_level": level})
    a, _, ha = q.read_artifact(paths["pergroup"])
    b, _, _ = q.read_artifact(paths["brotli"])
    assert ha["compressor"] == "pergroup" and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tensors, _, _ = q.quantize_state_dict(role_state(), cfg)
    container = q.pack(tensors, {"x": 1})
    body = q.compress(container, "pergroup", {"backend": backend, "level": level})
    assert q.decompress(body, "pergroup") == container
    s = split(body)
    assert len(s) == 9 and body[:4] == b"PGRP"
    perms = np.frombuffer(q.decompress(s[8], "brotli"), dtype="<u2")
    assert len(perms) == 96 + 2 * 64 + 2 * 128  # tok_emb, Q and MLP-up rows; the other roles are not sorted
    qm = [tensors[f"blocks.{i}.attn.c_q.weight.q"].numpy() for i in range(2)]  # stream 2 = Q: sorted rows, transposed
    orders = [perms[96 + 64 * i : 96 + 64 * (i + 1)] for i in range(2)]
    assert [o.tolist() for o in orders] == [pg.l1_chain(m).tolist() for m in qm]
    assert pg._uncm(s[2]) == b"".join(m[o].T.tobytes() for m, o in zip(qm, orders))
    kq = [tensors[f"blocks.{i}.attn.c_k.weight.q"].numpy() for i in range(2)]  # stream 1 = K: unsorted, transposed
    assert pg._uncm(s[1]) == b"".join(m.T.tobytes() for m in kq)


def test_corrupt_pergroup_stream_is_one_artifact_error_line(tmp_path):
    pytest.importorskip("zpaq")
    tensors, _, _ = quant(role_state(), quant_keep_float_numel=100)
    container = q.pack(tensors, {})
    body = bytearray(q.compress(container, "pergroup", {"level": 2}))
    s = split(bytes(body))
    bad = []
    for at in (8 + 4 * 9 + 10, 8 + 4 * 9 + sum(map(len, s[:7])) + 5, len(body) - 3):  # in a role, the rest, the perms
        b = bytearray(body)
        b[at] ^= 0x5A
        bad.append(bytes(b))
    bad += [bytes(body[:-7]), b"PGRP" + bytes(4), bytes(body[:4]) + b"\xff" + bytes(body[5:])]
    for b in bad:
        with pytest.raises(q.ArtifactError) as ei:
            q.decompress(b, "pergroup")
        assert "\n" not in str(ei.value) and "pergroup stream is corrupt" in str(ei.value)
    # through the file: a damaged stream with a fixed-up checksum is still one line
    path = tmp_path / "a.ptz"
    q.write_artifact(path, role_state(), {**MIXED, "quant_keep_float_numel": 100, "compressor": "pergroup", "pergroup_level": 2})
    blob = bytearray(path.read_bytes())
    head = len(q.MAGIC) + 4 + len(b"pergroup") + 12
    blob[head + 8 + 4 * 9 + 10] ^= 0x5A
    struct.pack_into("<I", blob, len(q.MAGIC) + 4 + len(b"pergroup"), zlib.crc32(bytes(blob[head:])))
    path.write_bytes(bytes(blob))
    with pytest.raises(q.ArtifactError) as ei:
        q.read_artifact(path)
    assert "\n" not in str(ei.value) and "corrupt" in str(ei.value)


def test_pergroup_keys_are_validated():
    with pytest.raises(ValueError, match="pergroup_level"):
        q.quant_settings({"compressor": "pergroup", "pergroup_level": 9})
    with pytest.raises(ValueError, match="pergroup_backend"):
        q.quant_settings({"pergroup_backend": "lrzip"})
    assert q.quant_settings({"pergroup_backend": "ppmd", "pergroup_level": 16})["pergroup_level"] == 16


def test_planner_knows_gates_lqer_and_pergroup():
    shapes = {"tok_emb.weight": (8192, 512), "blocks.0.attn.c_q.weight": (512, 512), "blocks.0.attn.c_k.weight": (256, 512),
              "blocks.0.mlp.fc.weight": (2048, 512), "blocks.0.mlp.proj.weight": (512, 2048),
              "blocks.0.attn.attn_gate_w": (8, 12), "blocks.0.q_gain": (8,)}
    cfg = {"quant_scheme": "mixed", "quant_bits_embed": 7, "quant_clip": "sdclip", "lqer_rank": 4, "lqer_top_k": 3,
           "lqer_mode": "asym", "quant_gate_int8": True, "compressor": "pergroup"}
    groups = q.param_groups_of(shapes, cfg)
    assert groups["gate"] == 96 and groups["float"] == 8 and groups["perm"] == 8192 + 512 + 2048
    assert groups["lqer"] == 4 * (8192 + 512) + 2 * 4 * (2048 + 512)  # the 3 largest matrices
    rows = {r["group"]: r for r in q.plan(groups, cfg, 0)["rows"]}
    bro = {**cfg, "compressor": "brotli"}
    brotli = {r["group"]: r for r in q.plan(q.param_groups_of(shapes, bro), bro, 0)["rows"]}
    assert "perm" not in brotli and rows["lqer"]["bytes"] == round(groups["lqer"] * q.EXTRA_BITS["lqer"] / 8)
    for g in ("embed", "attn", "mlp"):
        assert rows[g]["bytes"] == pytest.approx(brotli[g]["bytes"] * q.PERGROUP_FACTOR[g], abs=1)
    assert "gate" not in q.param_groups_of(shapes, {**cfg, "quant_gate_int8": False})
