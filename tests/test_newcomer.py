"""Issue 14: what a newcomer meets first - output paths, one-line errors, eval blocks, the dataset
fingerprint, per-entry-point help, dry-run validation, foreign files, text input, console output."""
import pickle
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _util import ROOT, run_train, tiny_args

sys.path.insert(0, str(ROOT))
import data_loader  # noqa: E402
import make_record as mr  # noqa: E402
import quantize  # noqa: E402
import train_gpt as tg  # noqa: E402
import ttt_eval as te  # noqa: E402
from test_records import build_args, ours, write  # noqa: E402

sys.path.insert(0, str(ROOT / "data"))
import prepare  # noqa: E402


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# -----------------------------------------------------------------------------
# 1. outputs checked at start; every user-facing failure one line; a failed final write loses nothing


def test_unwritable_out_dir_fails_before_any_data_or_training(sample_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    p = run_train(tiny_args(sample_data, out_dir=str(blocker / "run"), run_id="ro"), tmp_path, check=False)
    assert p.returncode == 2 and str(blocker / "run") in one_line(p.stderr) and "not writable" in p.stderr
    assert "step:" not in p.stdout and "val_loader" not in p.stdout and not (tmp_path / "logs/ro.txt").exists()


def test_too_little_free_space_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data_loader.shutil, "disk_usage", lambda d: SimpleNamespace(free=10 * 2**20))
    data_loader.check_outputs([tmp_path / "x"])
    with pytest.raises(ValueError, match=r"has 10 MiB free; checkpoints and the artifact need about 95 MiB"):
        data_loader.check_outputs([tmp_path / "x"], 100_000_000)


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), tg.DataError("shard bad"), quantize.ArtifactError("art bad")])
def test_run_cli_turns_user_failures_into_one_line(exc, capsys):
    def boom(argv):
        raise exc

    with pytest.raises(SystemExit) as e:
        tg.run_cli(boom)
    assert e.value.code == 2 and one_line(capsys.readouterr().err).startswith("error: ")


def test_failed_final_write_rescues_the_weights_and_logs_a_short_config(sample_data, tmp_path, monkeypatch, capsys):
    """The artifact cannot be read back (a disk fault after training): the run ends in one OSError naming
    where the trained weights went; they load safely and quantize.py makes the artifact from them. The same
    run shows the short console config, the labelled size lines and the fingerprint handed to the artifact."""
    monkeypatch.chdir(tmp_path)
    seen = {}
    write_artifact = quantize.write_artifact

    def spy(*a, **kw):
        seen.update(kw)
        return write_artifact(*a, **kw)

    monkeypatch.setattr(quantize, "write_artifact", spy)
    monkeypatch.setattr(quantize, "read_artifact", lambda p: (_ for _ in ()).throw(OSError(5, "Input/output error", str(p))))
    with pytest.raises(OSError, match="the trained weights are in") as e:
        tg.main(tiny_args(sample_data, run_id="rw"))
    saved = Path(re.search(r"weights are in (\S+)", str(e.value))[1])
    assert saved == Path("runs/rw/rw_rescued_weights.pt") and saved.is_file()
    state, config = quantize.load_checkpoint(saved)
    assert config["run_id"] == "rw" and "tok_emb.weight" in state
    out = capsys.readouterr().out
    # 9: the console gets a summary, the log file keeps the full resolved config
    assert not re.search(r"^config:\{", out, re.M) and re.search(r"^config_summary: \d+ keys from flag; the resolved config is in logs/rw.txt$", out, re.M)
    log = (tmp_path / "logs/rw.txt").read_text()
    assert re.search(r"^config:\{", log, re.M)
    raw = re.search(r"^Total submission size: (\d+) bytes \(unquantized final_model.pt \+ code: not what is submitted\)$", out, re.M)
    art = re.search(r"^Total submission size int8\+zlib: (\d+) bytes \(artifact \+ code: the size the 16,000,000-byte cap counts\)$", out, re.M)
    assert raw and art
    r = mr.parse_log(tmp_path / "logs/rw.txt")  # make_record still reads both official lines
    assert (r.info["raw_total_bytes"], r.total_bytes) == (int(raw[1]), int(art[1]))
    # 3: the artifact records what it was trained and scored on
    stream = tg.load_val_stream(tg.shard_files(sample_data["data_path"], "val"), 512)
    assert seen["dataset"] == tg.dataset_fingerprint(stream, sample_data["tokenizer_path"]) and seen["dataset"]["val_tokens"] == stream.size


def test_rescue_falls_back_when_out_dir_is_gone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "blocked").write_text("")
    cfg = tg.load_config(None, {"num_layers": "1", "model_dim": "32", "num_heads": "2", "num_kv_heads": "1", "vocab_size": "64", "run_id": "x"})[0]
    r = SimpleNamespace(cfg=cfg, base=tg.GPT(cfg), out_dir=tmp_path / "blocked" / "run")
    msg = tg.rescue(r, OSError(28, "No space left on device"))
    assert msg.startswith("[Errno 28] No space left on device; the trained weights are in ") and (tmp_path / "tmp/x_rescued_weights.pt").is_file()


# -----------------------------------------------------------------------------
# 2 and 3: ttt_eval blocks and the dataset fingerprint (in process: an artifact from an untrained model)


@pytest.fixture(scope="module")
def art(sample_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("newcomer_art")
    over = {a[2:].split("=", 1)[0]: a.split("=", 1)[1] for a in tiny_args(sample_data, run_id="ev", eval_stride=32)}
    cfg = tg.load_config(None, over, {})[0]
    torch.manual_seed(0)
    stream = tg.load_val_stream(tg.shard_files(cfg.data_path, "val"), cfg.vocab_size)
    quantize.write_artifact(d / "a.ptz", tg.unbank(tg.GPT(cfg).state_dict()), asdict(cfg),
                            dataset=tg.dataset_fingerprint(stream, cfg.tokenizer_path))
    return d, d / "a.ptz"


def test_each_eval_is_a_block_and_a_failed_one_poisons_nothing(art, monkeypatch):
    d, a = art
    monkeypatch.chdir(d)
    with pytest.raises(ValueError, match="eval_stride=999"):  # fails after eval_start
        te.main(["--artifact", str(a), "--run_id=blocks", "--eval_stride=999"])
    te.main(["--artifact", str(a), "--run_id=blocks"])
    log = (d / "logs/blocks.txt").read_text()
    starts = re.findall(r"^eval_start .* block:(\w+)$", log, re.M)
    assert len(starts) == 2 and re.search(rf"^eval_end block:{starts[0]} status:failed error:ValueError: eval_stride=999", log, re.M)
    ok = re.search(rf"^eval_end block:{starts[1]} status:ok score:final_sliding_window val_bpb:([\d.]+)$", log, re.M)
    r = mr.parse_log(d / "logs/blocks.txt")
    assert ok and r.score().bpb == float(ok[1]) and any(f"eval block {starts[0]} (mode:sliding) failed" in n for n in r.score_notes())


def eval_block(block, mode="legal_ttt", bpb=None, end="ok"):
    lines = [f"eval_start artifact:runs/x/final_model.mixed.ptz bytes:78632 mode:{mode} legality:legal block:{block}"]
    if bpb is not None:
        lines += [f"{mode} val_loss:6.0000 val_bpb:{bpb:.4f} eval_time:100ms", f"{mode}_exact val_loss:6.00000000 val_bpb:{bpb:.8f}"]
    if end == "ok":
        lines.append(f"eval_end block:{block} status:ok score:{mode} val_bpb:{bpb:.8f}")
    elif end == "failed":
        lines.append(f"eval_end block:{block} status:failed error:ValueError: wrong --config")
    return "\n".join(lines) + "\n"


def test_make_record_uses_the_last_complete_block(tmp_path, capsys):
    base = ours(seed=42, score=False)  # training, then an eval (old format) that died after eval_start
    log = write(tmp_path / "logs/a.txt", base + eval_block("f1", end="failed") + eval_block("ok1", bpb=4.4362) + eval_block("k1", bpb=4.1, end=None))
    r = mr.parse_log(log)
    assert r.score().bpb == 4.4362  # not the killed block's 4.1, which never ended
    notes = "\n".join(r.score_notes())
    assert "eval block 1 (mode:legal_ttt) incomplete" in notes and "eval block f1 (mode:legal_ttt) failed (ValueError: wrong --config)" in notes
    assert "eval block k1 (mode:legal_ttt) incomplete (no eval_end" in notes
    assert mr.main(build_args(tmp_path, [log], [42], name="blocks")) == 0, capsys.readouterr().err
    readme = (tmp_path / "records/track_non_record_16mb/2026-04-01_blocks/README.md").read_text()
    assert "eval block f1" in readme
    later = write(tmp_path / "logs/b.txt", base + eval_block("s1", bpb=4.5) + eval_block("s2", bpb=4.4))
    assert mr.parse_log(later).score().bpb == 4.4 and "eval block s1 (mode:legal_ttt) superseded" in "".join(mr.parse_log(later).score_notes())
    dead = write(tmp_path / "logs/c.txt", base + eval_block("f2", end="failed"))
    assert mr.main(build_args(tmp_path, [dead], [42], name="dead")) == 2 and "no score after its eval_start" in capsys.readouterr().err


def test_eval_refuses_other_val_data_or_tokenizer(art, sample_data, tmp_path, monkeypatch):
    d, a = art
    assert quantize.read_artifact(a)[2]["dataset"]["val_tokens"] > 0
    monkeypatch.chdir(d)
    edited = tmp_path / "edited"
    shutil.copytree(sample_data["data_path"], edited)
    val = sorted(edited.glob("fineweb_val_*.bin"))[0]
    raw = bytearray(val.read_bytes())
    raw[tg.SHARD_HEADER_BYTES + 200] ^= 1  # one val token changed
    val.write_bytes(bytes(raw))
    (edited / "manifest.json").unlink()
    with pytest.raises(tg.DataError, match=r"not the data this artifact was made with \(val_sha256 ") as e:
        te.main(["--artifact", str(a), "--run_id=fp1", f"--data_path={edited}"])
    assert "\n" not in str(e.value) and "--allow-data-mismatch" in str(e.value)
    with pytest.raises(tg.DataError, match="record_mode refuses"):
        te.main(["--artifact", str(a), "--run_id=fp2", f"--data_path={edited}", "--allow-data-mismatch", "--record_mode=1"])
    te.main(["--artifact", str(a), "--run_id=fp3", f"--data_path={edited}", "--allow-data-mismatch"])
    assert "eval_data:MISMATCH" in (d / "logs/fp3.txt").read_text()
    other_tok = tmp_path / "other.model"
    other_tok.write_bytes(Path(sample_data["tokenizer_path"]).read_bytes())
    te.main(["--artifact", str(a), "--run_id=fp4", f"--tokenizer_path={other_tok}"])  # the same tokenizer elsewhere: allowed
    assert "eval_data:matches the artifact's fingerprint" in (d / "logs/fp4.txt").read_text()


# -----------------------------------------------------------------------------
# 4 and 5: help per entry point, every key described; dry-run validates every key


def test_help_per_entry_point_describes_every_key(capsys):
    with pytest.raises(SystemExit):
        te.main(["-h"])
    out = capsys.readouterr().out
    assert out.startswith("ttt_eval.py:") and all(f in out for f in ("--artifact", "--check-legality", "--allow-illegal", "--allow-data-mismatch"))
    assert "--eval_mode='sliding' (str): sliding | legal_ttt | phased_ttt | multipass_min | prequant_ttt" in out and "--num_layers" not in out
    with pytest.raises(SystemExit):
        tg.parse_cli(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: train_gpt.py")
    rows = dict(re.findall(r"^  --(\w+)=.*? \((?:int|float|str|bool)\): (.*)$", out, re.M))
    assert set(rows) == set(tg.config_field_types()) and all(len(doc) > 5 for doc in rows.values())
    assert "zlib | lzma | zstd | brotli" in rows["compressor"] and "int8" in rows["quant_scheme"] and "mixed" in rows["quant_scheme"]


@pytest.mark.parametrize("flag, needle", [("--eval_mode=bogus", "eval_mode must be one of sliding, legal_ttt"),
                                          ("--compressor=bogus", "compressor must be one of zlib"),
                                          ("--quant_scheme=int4", "quant_scheme must be one of int8, mixed"),
                                          ("--quant_bits_mlp=3", "quant_bits_mlp=3 is not one of 5, 6, 7, 8"),
                                          ("--ttt_optimizer=lion", "ttt_optimizer must be one of sgd, adamw")])
def test_dry_run_validates_every_key(flag, needle):
    with pytest.raises(ValueError, match=needle):
        tg.main(["--dry-run", flag])


def test_every_shipped_config_still_validates():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        tg.load_config(str(path), {}, {})


# -----------------------------------------------------------------------------
# 6. foreign files: one line naming the file and what it is, never advice to unpickle


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/pgolf_newcomer_pwned"),))


def test_foreign_files_are_one_line_and_never_unpickled(tmp_path, art):
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": Payload()}, foreign)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(pickle.dumps([1, 2]) + b"\x00junk")
    for path, what in ((foreign, "objects other than tensors"), (junk, "not a torch file")):
        with pytest.raises(ValueError) as e:
            tg.load_checkpoint(str(path))
        msg = one_line(str(e.value))
        assert str(path) in msg and what in msg and "weights_only" not in msg and "trust" not in msg
    assert not Path("/tmp/pgolf_newcomer_pwned").exists()
    with pytest.raises(quantize.ArtifactError, match=r"a\.ptz is a compressed artifact \(\.ptz\), not a trainer checkpoint"):
        quantize.main([str(art[1])])
    ck = tmp_path / "ck.pt"
    torch.save({"w": torch.zeros(4, 4)}, ck)
    bad = tmp_path / "h.pt"
    bad.write_text("not hessians")
    with pytest.raises(quantize.ArtifactError, match=r"h\.pt is not a Hessian file: not a torch file"):
        quantize.main([str(ck), "--hessians", str(bad)])
    torch.save([torch.zeros(3)], bad)
    with pytest.raises(quantize.ArtifactError, match=r"h\.pt is not a Hessian file: expected"):
        quantize.main([str(ck), "--hessians", str(bad)])



def test_quantizing_a_raw_state_dict_warns_that_the_artifact_has_no_model_config(tmp_path, capsys):
    """final_model.pt is a bare state dict: its artifact cannot be re-scored without every model key, so say so."""
    state = {"blocks.0.mlp.fc.weight": torch.randn(8, 8)}
    raw, wrapped = tmp_path / "final_model.pt", tmp_path / "ckpt_step000001.pt"
    torch.save(state, raw)
    torch.save({"model": state, "config": {"model_dim": 8}}, wrapped)
    quantize.main([str(raw), "--out", str(tmp_path / "a.ptz")])
    assert "WARNING: " + str(raw) + " carries no model config" in capsys.readouterr().out
    quantize.main([str(wrapped), "--out", str(tmp_path / "b.ptz")])
    assert "WARNING" not in capsys.readouterr().out


# -----------------------------------------------------------------------------
# 7. text input and the manifest


def test_binary_text_input_names_file_and_line(tmp_path):
    for name, data, line in (("a.txt", b"one\n\ntwo\nthree \x80\x81\n", 4), ("b.jsonl", b'{"text": "ok"}\n\xff\xfe\n', 2)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / name))}:{line}: not UTF-8 text"):
            list(prepare.iter_file_documents([tmp_path / name]))


def test_missing_manifest_warns_and_record_mode_refuses(sample_data, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(sample_data["data_path"], d)
    (d / "manifest.json").unlink()
    stream = tg.load_val_stream(tg.shard_files(d, "val"), 512)
    args = (d, sample_data["tokenizer_path"], 512, 1, stream, tg.shard_files(d, "train"))
    lines = prepare.check_dataset(*args)
    assert any(x.startswith("WARNING: dataset_manifest:none") and "NOT verified" in x for x in lines)
    with pytest.raises(tg.DataError, match="manifest.json missing: record_mode needs the manifest"):
        prepare.check_dataset(*args, record_mode=True)


# -----------------------------------------------------------------------------
# 11. README commands use one interpreter name


def test_readme_uses_python3_throughout():
    readme = (ROOT / "README.md").read_text()
    assert not re.findall(r"(?<![\w/-])python (?=[\w./-]+\.py|-m )", readme)
    assert "python3 data/prepare.py sample && python3 train_gpt.py --config configs/smoke.toml" in readme
