"""quantize.py is a leaf: it never imports train_gpt.py. The trainer hands it the state, Hessians and settings once
(export) and gets the artifact and its report back; the CLI reads TOML quant keys and the bank layout itself."""
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from _util import ROOT

sys.path.insert(0, str(ROOT))
import quantize as q  # noqa: E402
import train_gpt as tg  # noqa: E402

TINY = {"num_layers": "2", "model_dim": "32", "num_heads": "2", "num_kv_heads": "1", "vocab_size": "64"}


def test_importing_quantize_does_not_import_train_gpt():
    prog = "import sys, quantize; print(sorted(m for m in ('train_gpt', 'ttt_eval', 'data_loader') if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ""})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
    assert "import train_gpt" not in (ROOT / "quantize.py").read_text() and "from train_gpt" not in (ROOT / "quantize.py").read_text()


def test_code_files_match_the_trainer():
    assert q.CODE_FILES == tg.CODE_FILES


@pytest.mark.parametrize("value,typ", [("1", bool), ("off", bool), ("Yes", bool), ("2", bool), (1, bool), (2, bool), (True, bool),
                                       (1, float), (" 1.5 ", float), ("x", float), (True, int), (1.0, int), ("7", int), ("7.0", int),
                                       ("abc", str), (3, str), (0, bool)])
def test_coerce_follows_the_trainers_rules(value, typ):
    def outcome(fn):
        try:
            return "ok", fn("k", value, typ, "src")
        except ValueError as e:
            return "error", str(e)

    got, want = outcome(q.coerce), outcome(tg._coerce)
    assert got == want and type(got[1]) is type(want[1])


def test_toml_settings_are_read_without_the_trainer(tmp_path):
    (tmp_path / "c.toml").write_text('[model]\nmodel_dim = 768\nnot_a_trainer_key = 1\n[quant]\nquant_bits_mlp = 5\n'
                                     'sdclip_k_mlp = 10\ngptq = true\ncode_packer = "minify_brotli"\n')
    assert q.load_toml_settings(tmp_path / "c.toml") == {"quant_bits_mlp": 5, "sdclip_k_mlp": 10.0, "gptq": True,
                                                         "code_packer": "minify_brotli"}
    (tmp_path / "bad.toml").write_text('quant_bits_mlp = "six"\n')
    with pytest.raises(ValueError, match=r"config key 'quant_bits_mlp' from \S+bad.toml: 'six' is not a valid int"):
        q.load_toml_settings(tmp_path / "bad.toml")
    (tmp_path / "broken.toml").write_text("quant_bits_mlp = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        q.load_toml_settings(tmp_path / "broken.toml")


def test_checkpoints_carry_their_bank_layout(tmp_path):
    """The trainer's checkpoints store BANKS; quantize splits the banks by that layout, and by the layout of
    pgolf-ckpt/2 checkpoints for files written before they stored it."""
    cfg = tg.load_config(None, TINY, {})[0]
    state = {k: v.detach() for k, v in tg.GPT(cfg).state_dict().items()}
    want = tg.unbank(state)
    assert set(q.unbank(state, tg.BANKS)) == set(want) and all(torch.equal(q.unbank(state, tg.BANKS)[k], v) for k, v in want.items())
    for name, extra in (("new.pt", {"banks": tg.BANKS}), ("old.pt", {})):
        torch.save({"model": state, "config": asdict(cfg), **extra}, tmp_path / name)
        got, config = q.load_checkpoint(tmp_path / name)
        assert config["model_dim"] == 32 and set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())
    # a layout the legacy table does not know: only the carried one can split it
    odd = {"w_bank": torch.arange(12.0).reshape(4, 3, 1), "x": torch.zeros(2)}
    torch.save({"model": odd, "banks": {"w_bank": ("a", "b")}}, tmp_path / "odd.pt")
    got, _ = q.load_checkpoint(tmp_path / "odd.pt")
    assert set(got) == {"x", "blocks.0.a.weight", "blocks.1.a.weight", "blocks.0.b.weight", "blocks.1.b.weight"}
    assert torch.equal(got["blocks.1.b.weight"], odd["w_bank"][3])


def test_export_writes_the_artifact_and_logs_the_official_lines(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"tok_emb.weight": torch.randn(512, 160, generator=g) * 0.1, "blocks.0.attn_scale": torch.ones(64),
             "blocks.0.attn.c_q.weight": torch.randn(128, 64, generator=g) * 0.05}
    texts = {"train_gpt.py": "print(1)\n", "quantize.py": "X = 2\n"}
    lines = []
    st = q.export(tmp_path / "a.ptz", state, {"quant_scheme": "int8", "compressor": "zlib", "model_dim": 64}, 1234,
                  dataset={"val_tokens": 9}, code_texts=texts, log=lines.append)
    art = (tmp_path / "a.ptz").stat().st_size
    assert st["artifact_bytes"] == art and st["code_bytes"] == 15 and st["total"] == art + 15
    n = sum(v.numel() for v in state.values())
    assert lines[:4] == ["Serialized model: 1234 bytes", "Code size: 15 bytes (raw train_gpt.py:9 quantize.py:6)",
                         "Total submission size: 1249 bytes (unquantized final_model.pt + code: not what is submitted)",
                         f"artifact:{tmp_path / 'a.ptz'}"]
    assert lines[4].startswith(f"Serialized model int8+zlib: {art} bytes (payload:") and "compressor:zlib " in lines[4]
    assert [ln.split()[1] for ln in lines if ln.startswith("quant_table: ")] == ["group", "embed", "float"]
    assert lines[-3:] == [f"Total submission size int8+zlib: {art + 15} bytes (artifact + code: the size the 16,000,000-byte cap counts)",
                          f"bits_per_param:{8 * art / n:.3f} (artifact bytes * 8 / {n} params)",
                          f"size_margin: {16_000_000 - art - 15} bytes under the 16,000,000-byte cap"]
    sd, config, header = q.read_artifact(tmp_path / "a.ptz")
    assert config["model_dim"] == 64 and header["dataset"] == {"val_tokens": 9} and set(sd) == set(state)
    # record mode over the cap: every line is logged first, then one clear error
    lines.clear()
    with pytest.raises(ValueError, match="over the 16,000,000-byte cap by .*not a valid record"):
        q.export(tmp_path / "b.ptz", state, {"record_mode": True}, 0, code_texts={"train_gpt.py": "#" * 16_000_000}, log=lines.append)
    assert lines[-1].startswith("bits_per_param:") and (tmp_path / "b.ptz").is_file()
