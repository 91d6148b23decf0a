"""Code bytes as PR #1855 counts them (code_packer = "minify_brotli", spec 3.7): pyminify with the record's options,
brotli-11, base85, a two-line stub that decodes and execs it; raw text when python-minifier is missing."""
import base64
import os
import subprocess
import sys

import brotli
import pytest
import torch

from _util import ROOT

sys.path.insert(0, str(ROOT))
import quantize as q  # noqa: E402
import train_gpt as tg  # noqa: E402

PROG = '''"""Module docstring."""
import sys


def fib(n):
    """Docstring."""
    assert n >= 0, "never negative"
    a, b = 0, 1
    for _ in range(n):  # a comment
        a, b = b, a + b
    return a


class Box:
    value: float = 2.0  # a class attribute annotation survives (dataclasses need them)

    def get(self) -> float:
        return self.value * 2.5


TEXT = "keep # this literal"
if __name__ == "__main__":
    print(fib(15), Box().get(), __doc__, TEXT, sys.argv[1:])
'''


def run(args, cwd, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": ""}, **kw)


def body(packed: str) -> str:
    return brotli.decompress(base64.b85decode(packed.split('"')[1])).decode()


def test_wrapper_is_two_deterministic_lines_of_minified_brotli_base85(tmp_path):
    pm = pytest.importorskip("python_minifier")
    packed = q.pack_code(PROG, "minify_brotli")
    assert packed == q.pack_code(PROG, "minify_brotli") and packed.count("\n") == 2
    assert packed.startswith('import brotli as B,base64 as A\nexec(B.decompress(A.b85decode("')
    code = body(packed)
    assert code == pm.minify(PROG, rename_locals=False, hoist_literals=False, remove_literal_statements=True, remove_asserts=True,
                             prefer_single_line=True)
    assert "docstring" not in code.lower() and "comment" not in code and "assert" not in code and "keep # this literal" in code
    assert "def fib(n)" in code and "value:float" in code.replace(" ", "")  # locals keep their names; class annotation kept
    for d, text in ((tmp_path / "src", PROG), (tmp_path / "out", packed)):
        d.mkdir()
        (d / "prog.py").write_text(text)
    outs = [run(["prog.py", "a"], tmp_path / d) for d in ("src", "out")]
    assert outs[1].returncode == 0, outs[1].stderr
    assert outs[0].stdout == "610 5.0 Module docstring. keep # this literal ['a']\n"
    assert outs[1].stdout == "610 5.0 None keep # this literal ['a']\n"  # docstrings are gone, nothing else changes
    imp = [run(["-c", "import prog; print(prog.fib(10), prog.Box.value)"], tmp_path / d) for d in ("src", "out")]
    assert imp[1].returncode == 0 and imp[0].stdout == imp[1].stdout == "55 2.0\n"


def test_without_python_minifier_the_raw_text_is_wrapped(monkeypatch):
    monkeypatch.setitem(sys.modules, "python_minifier", None)  # import fails as if not installed
    packed = q.pack_code(PROG, "minify_brotli")
    assert body(packed) == PROG
    n, detail = q.code_size(None, True, {"prog.py": PROG}, "minify_brotli")
    assert n == len(packed.encode())
    assert detail == f"packed prog.py:{n}; packer minify_brotli (python-minifier not installed: raw text), raw {len(PROG.encode())} bytes"


def test_code_size_reports_wrapped_and_raw_bytes(tmp_path):
    sizes = q.pack_files(ROOT, tmp_path, "minify_brotli")
    n, detail = q.code_size(ROOT, True, packer="minify_brotli")
    raw = sum((ROOT / f).stat().st_size for f in q.CODE_FILES)
    assert set(sizes) == set(q.CODE_FILES) and n == sum(sizes.values()) == sum((tmp_path / f).stat().st_size for f in sizes)
    assert detail.startswith("packed train_gpt.py:") and detail.endswith(f", raw {raw} bytes") and "packer minify_brotli (" in detail
    assert n < raw / 3
    assert q.code_size(ROOT, True, packer="lzma")[1].endswith(f"; packer lzma, raw {raw} bytes")
    assert q.code_size(ROOT, False, packer="minify_brotli") == (raw, q.code_size(ROOT)[1])  # the packer only matters when packed
    with pytest.raises(ValueError, match="code_packer='zip' is not one of lzma, minify_brotli"):
        q.pack_code(PROG, "zip")
    with pytest.raises(ValueError, match="code_packer must be one of lzma, minify_brotli; got 'zip'"):
        tg.load_config(None, {"code_packer": "zip"}, {})


def test_wrapped_code_files_import_and_run(tmp_path):
    """The four shipped files, wrapped, import; the trainer's dry run and the quantize CLI run from them and agree with
    the raw files (apart from the code bytes, which count the files that run)."""
    pytest.importorskip("python_minifier")
    q.pack_files(ROOT, tmp_path, "minify_brotli")
    imp = run(["-c", "import train_gpt, quantize, ttt_eval, data_loader, sys; print(sys.modules['quantize'].CODE_FILES[2])"], tmp_path)
    assert imp.returncode == 0 and imp.stdout == "quantize.py\n", imp.stderr
    dry = [run(["train_gpt.py", "--config", str(ROOT / "configs/smoke.toml"), "--dry-run"], d, timeout=300) for d in (ROOT, tmp_path)]
    assert dry[1].returncode == 0, dry[1].stderr
    keep = lambda out: [ln for ln in out.splitlines() if ln.startswith(("model_params:", "artifact_plan: attn"))]  # noqa: E731
    assert keep(dry[0].stdout) == keep(dry[1].stdout) and len(keep(dry[0].stdout)) == 2
    g = torch.Generator().manual_seed(0)
    torch.save({"tok_emb.weight": torch.randn(512, 160, generator=g), "blocks.0.mlp.fc.weight": torch.randn(256, 128, generator=g)},
               tmp_path / "final_model.pt")
    cli = [run([str(d / "quantize.py"), "final_model.pt", "--scheme", "mixed", "--compressor", "brotli"], tmp_path)
           for d in (ROOT, tmp_path)]
    assert cli[1].returncode == 0, cli[1].stderr
    same = lambda out: [ln.split("code_bytes:")[0] for ln in out.splitlines()]  # noqa: E731
    assert same(cli[0].stdout) == same(cli[1].stdout) and "artifact_bytes:" in cli[1].stdout
    usage = run(["ttt_eval.py", "--help"], tmp_path)  # its usage text starts from the docstring the packer strips
    assert usage.returncode == 0 and "--check-legality" in usage.stdout, usage.stderr
