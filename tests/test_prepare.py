"""data/prepare.py: shard writer, text/jsonl/hf pipelines, manifest, download (local fake remote), sample, verify."""
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import prepare
from train_gpt import SHARD_HEADER_BYTES, SHARD_MAGIC, SHARD_VERSION, DataError, load_shard

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the model reads tokens from shards and writes bytes per second while 12345 digits and 3.14 "
         "café naïve 日本語 🙂 Zürich <tag> x=y*2; (a, b) [c] {d}").split()


def make_corpus(n=40, seed=0):
    """Single-paragraph documents (no blank lines inside), with unicode, digits and odd spacing."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for _ in range(n)]
    docs[3] = "  leading spaces and  double  spaces\nand a second line"
    docs[5] = "x"
    return docs


def stream_of(sp, docs):
    return np.array([t for d in docs for t in [sp.bos_id(), *sp.encode(d)]], dtype=np.uint16)


def split_stream(sp, split_dir, split):
    files = sorted(Path(split_dir).glob(f"fineweb_{split}_*.bin"))
    return files, (np.concatenate([load_shard(f) for f in files]) if files else np.zeros(0, np.uint16))


def docs_in(tokens, bos):
    starts = list(np.flatnonzero(tokens == bos)) + [tokens.size]
    return [tokens[a + 1 : b] for a, b in zip(starts, starts[1:])]


@pytest.fixture(scope="module")
def sp(sample_data):
    return spm.SentencePieceProcessor(model_file=sample_data["tokenizer_path"])


def assert_nothing_left(tmp_path, keep):
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


# -----------------------------------------------------------------------------
# shards


def test_write_shard_roundtrip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=5000)
    tokens[:2] = (0, 65535)
    path = tmp_path / "fineweb_train_000000.bin"
    assert prepare.write_shard(path, tokens) == 5000
    assert path.stat().st_size == SHARD_HEADER_BYTES + 2 * 5000
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [SHARD_MAGIC, SHARD_VERSION, 5000] and not header[3:].any()
    np.testing.assert_array_equal(load_shard(path), tokens)
    prepare.write_shard(tmp_path / "empty.bin", [])
    assert load_shard(tmp_path / "empty.bin").size == 0
    assert_nothing_left(tmp_path, ["fineweb_train_000000.bin", "empty.bin"])  # no temp files


@pytest.mark.parametrize("bad", [[1, 65536], [-1, 5]])
def test_write_shard_rejects_ids_outside_uint16(tmp_path, bad):
    with pytest.raises(ValueError, match="uint16"):
        prepare.write_shard(tmp_path / "x.bin", bad)
    assert_nothing_left(tmp_path, [])


def _corrupt(path, how):
    raw = bytearray(path.read_bytes())
    if how == "empty":
        raw = b""
    elif how == "short_header":
        raw = raw[:100]
    elif how == "bad_magic":
        raw[0:4] = np.int32(123).tobytes()
    elif how == "bad_version":
        raw[4:8] = np.int32(2).tobytes()
    elif how == "truncated":
        raw = raw[:-3]
    elif how == "trailing":
        raw += b"\x00\x00"
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["empty", "short_header", "bad_magic", "bad_version", "truncated", "trailing"])
def test_corrupt_shard_is_a_data_error_naming_the_file(tmp_path, sample_data, how):
    path = tmp_path / "fineweb_val_000000.bin"
    prepare.write_shard(path, [1, 5, 6, 7, 1, 9])
    _corrupt(path, how)
    with pytest.raises(DataError, match=str(path)):
        load_shard(path)
    with pytest.raises(DataError, match="fineweb_val_000000.bin"):
        prepare.build_manifest(tmp_path, sample_data["tokenizer_path"], "index")
    assert not (tmp_path / "manifest.json").exists()


# -----------------------------------------------------------------------------
# text / jsonl pipeline


def write_inputs(tmp_path, docs, fmt):
    """The documents split over two input files, to check files are read in order."""
    half, files = len(docs) // 2, []
    for i, part in enumerate((docs[:half], docs[half:])):
        f = tmp_path / f"in{i}.{fmt}"
        if fmt == "txt":
            f.write_text("\n\n\n".join(part) + "\n", encoding="utf-8")
        else:
            f.write_text("".join(json.dumps({"body": d, "id": k}) + "\n" for k, d in enumerate(part)), encoding="utf-8")
        files.append(str(f))
    return files


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_text_pipeline_shards_and_manifest(tmp_path, sample_data, sp, fmt):
    docs, n_val, shard = make_corpus(), 7, 97
    files = write_inputs(tmp_path, docs, fmt)
    out = tmp_path / "ds"
    tok = sample_data["tokenizer_path"]
    rc = prepare.main(["text", *files, "--tokenizer", tok, "--val-docs", str(n_val), "--out", str(out),
                       "--shard-tokens", str(shard), "--text-field", "body"])
    assert rc == 0
    bos = sp.bos_id()
    val_files, val = split_stream(sp, out, "val")
    train_files, train = split_stream(sp, out, "train")
    # val = exactly the first n_val documents, train = the rest, each [BOS] + ids, in order
    np.testing.assert_array_equal(val, stream_of(sp, docs[:n_val]))
    np.testing.assert_array_equal(train, stream_of(sp, docs[n_val:]))
    decoded = [sp.decode(d.tolist()) for d in docs_in(val, bos)]
    assert decoded == [" ".join(d.split()) for d in docs[:n_val]]  # the normalizer collapses whitespace
    # fixed-size shards, a partial last one per split, a flush at the split change, docs crossing shards
    for files_ in (val_files, train_files):
        assert len(files_) > 1 and [f.name[-10:] for f in files_] == [f"{i:06d}.bin" for i in range(len(files_))]
        assert all(load_shard(f).size == shard for f in files_[:-1]) and 0 < load_shard(files_[-1]).size <= shard
    assert load_shard(train_files[0])[0] == bos
    assert any(load_shard(f)[0] != bos for f in val_files[1:] + train_files[1:])
    # the manifest says what is on disk (checked independently of prepare's code)
    m = json.loads((out / "manifest.json").read_text())
    assert (m["format"], m["source"], m["vocab_size"], m["bos_id"]) == ("pgolf-dataset/1", "text", 512, 1)
    assert m["tokenizer"] == {"path": tok, "sha256": hashlib.sha256(Path(tok).read_bytes()).hexdigest()}
    for split, files_, stream, n_docs in (("val", val_files, val, n_val), ("train", train_files, train, len(docs) - n_val)):
        s = m["splits"][split]
        assert (s["docs"], s["tokens"]) == (n_docs, stream.size)
        assert s["shards"] == [{"file": f.name, "tokens": (f.stat().st_size - 1024) // 2,
                                "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files_]
    assert m["val_tokens"] == val.size
    assert m["val_sha256"] == hashlib.sha256(val.astype("<u2").tobytes()).hexdigest()
    # val_bytes = UTF-8 bytes of the SentencePiece-normalised val documents (the LUT identity)
    want = sum(len(sp.decode(sp.encode(d)).encode("utf-8")) for d in docs[:n_val])
    assert m["val_bytes"] == m["splits"]["val"]["bytes"] == want
    assert prepare.verify(out).startswith("ok")


def test_jsonl_keeps_blank_lines_and_empty_documents(tmp_path, sample_data, sp):
    docs = ["first para\n\nsecond para of the same doc", "", "third 42", "fourth doc", "fifth"]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) + "\n")
    m = prepare.build_dataset(lambda: prepare.iter_file_documents([f]), tmp_path / "ds", 2, "text",
                              tokenizer=sample_data["tokenizer_path"])
    assert (m["splits"]["val"]["docs"], m["splits"]["train"]["docs"]) == (2, 3)
    np.testing.assert_array_equal(split_stream(sp, tmp_path / "ds", "val")[1], stream_of(sp, docs[:2]))
    np.testing.assert_array_equal(split_stream(sp, tmp_path / "ds", "train")[1], stream_of(sp, docs[2:]))
    f.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: .*'text'"):
        list(prepare.iter_file_documents([f]))


def test_trained_tokenizer_uses_the_official_settings(tmp_path):
    texts = [" ".join(d.split()) for d in prepare.sample_documents()[:60]]  # one line per document
    f = tmp_path / "corpus.txt"
    f.write_text("\n\n".join(texts))
    out, tdir = tmp_path / "ds", tmp_path / "tok"
    args = ["text", str(f), "--vocab-size", "400", "--val-docs", "3", "--out", str(out), "--tokenizer-dir", str(tdir), "--name", "t"]
    assert prepare.main(args) == 0
    model = tdir / "t_400_bpe.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert [sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<s>", "</s>", "<unk>", "<0x00>"]
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in sp.encode("2024")] == ["2", "0", "2", "4"]  # split_digits
    assert not sp.id_to_piece(sp.encode("import")[0]).startswith("\u2581")  # no dummy prefix
    assert sp.decode(sp.encode("\ufb01ne  a\n\nb ")) == "fine a b"  # nmt_nfkc: NFKC + whitespace collapse
    assert sp.is_byte(sp.encode("\u65e5")[0])  # byte fallback for an unseen character
    vocab = (tdir / "t_400_bpe.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == sp.vocab_size() and vocab[0] == "<pad>\t0" and vocab[300].split("\t")[0] == sp.id_to_piece(300)
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer"]["path"] == str(model) and m["vocab_size"] == sp.vocab_size()
    assert m["splits"]["val"]["docs"] == 3 and m["splits"]["train"]["docs"] == 57
    # the same tokenizer path again: refused without --force (and nothing is overwritten)
    before = model.read_bytes()
    assert prepare.main(args[:-4] + ["--out", str(tmp_path / "ds2"), "--tokenizer-dir", str(tdir), "--name", "t"]) == 2
    assert model.read_bytes() == before and not (tmp_path / "ds2").exists()


def test_force_replaces_every_old_shard(tmp_path, sample_data):
    docs = make_corpus()
    build = lambda **kw: prepare.build_dataset(lambda: iter(docs), tmp_path / "ds", 5, "text",  # noqa: E731
                                               tokenizer=sample_data["tokenizer_path"], **kw)
    build(shard_tokens=50)
    assert len(list((tmp_path / "ds").glob("fineweb_train_*.bin"))) > 3
    with pytest.raises(ValueError, match="--force"):
        build()
    m = build(force=True)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin", "manifest.json"]
    assert m["splits"]["train"]["docs"] == len(docs) - 5


@pytest.mark.parametrize("mode", ["train", "reuse"])
def test_empty_input_is_an_error_and_writes_nothing(tmp_path, sample_data, mode):
    f = tmp_path / "empty.txt"
    f.write_text("\n\n   \n\n")
    opts = {"vocab_size": 400} if mode == "train" else {"tokenizer": sample_data["tokenizer_path"]}
    with pytest.raises(ValueError, match="no documents"):
        prepare.build_dataset(lambda: prepare.iter_file_documents([f]), tmp_path / "ds", 1, "text",
                              tokenizer_dir=tmp_path / "tok", **opts)
    assert_nothing_left(tmp_path, ["empty.txt"])  # no shards, no tokenizer, no staging dir


@pytest.mark.parametrize("n_val", [0, 4, 5])
def test_val_docs_must_leave_train_docs(tmp_path, n_val):
    docs = prepare.sample_documents()[:4]
    with pytest.raises(ValueError, match="val docs"):
        prepare.build_dataset(lambda: iter(docs), tmp_path / "ds", n_val, "text", vocab_size=400, tokenizer_dir=tmp_path / "tok")
    assert_nothing_left(tmp_path, [])  # no shards, no tokenizer, no staging dir


def test_vocab_over_uint16_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="65,536"):
        prepare.build_dataset(lambda: iter(["a b c", "d e"]), tmp_path / "ds", 1, "text", vocab_size=70000,
                              tokenizer_dir=tmp_path / "tok")
    assert_nothing_left(tmp_path, [])


def test_missing_tokenizer_is_an_error(tmp_path):
    with pytest.raises(DataError, match="nope.model"):
        prepare.build_dataset(lambda: iter(["a", "b"]), tmp_path / "ds", 1, "text", tokenizer=tmp_path / "nope.model")


# -----------------------------------------------------------------------------
# index / verify


def test_index_shards_written_elsewhere(tmp_path, sample_data, sp):
    docs = make_corpus(12, seed=3)
    val, train = stream_of(sp, docs[:6]), stream_of(sp, docs[6:])
    cut = int(np.flatnonzero(val == sp.bos_id())[3]) + 2  # inside doc 3: prev token crosses the shard boundary
    d = tmp_path / "other"
    d.mkdir()
    prepare.write_shard(d / "fineweb_val_000000.bin", val[:cut])
    prepare.write_shard(d / "fineweb_val_000001.bin", val[cut:])
    prepare.write_shard(d / "fineweb_train_000000.bin", train)
    assert prepare.main(["index", str(d)]) == 2  # no manifest to take the tokenizer from
    assert prepare.main(["index", str(d), "--tokenizer", sample_data["tokenizer_path"]]) == 0
    m = json.loads((d / "manifest.json").read_text())
    assert m["source"] == "index" and m["splits"]["val"]["docs"] == 6 and m["val_tokens"] == val.size
    assert m["val_bytes"] == sum(len(sp.decode(sp.encode(x)).encode()) for x in docs[:6])
    assert prepare.main(["index", str(d)]) == 0  # re-index: tokenizer and source come from the old manifest
    assert json.loads((d / "manifest.json").read_text()) == m


def test_verify_detects_changes(tmp_path, sample_data):
    d = tmp_path / "ds"
    shutil.copytree(sample_data["data_path"], d)
    assert prepare.verify(d).startswith("ok")
    shard = d / "fineweb_train_000000.bin"
    raw = bytearray(shard.read_bytes())
    raw[SHARD_HEADER_BYTES + 10] ^= 1  # one token changed, same size
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="fineweb_train_000000.bin: sha256 differ"):
        prepare.verify(d)
    r = subprocess.run([sys.executable, "data/prepare.py", "verify", str(d)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "fineweb_train_000000.bin" in r.stderr
    shutil.copy(sample_data["data_path"] + "/fineweb_train_000000.bin", shard)
    prepare.write_shard(d / "fineweb_train_000001.bin", [1, 2, 3])
    with pytest.raises(DataError, match="fineweb_train_000001.bin: on disk but not in the manifest"):
        prepare.verify(d)


def test_cli_error_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "ds"
    r = subprocess.run([sys.executable, "data/prepare.py", "text", str(tmp_path / "missing.txt"), "--vocab-size", "400",
                        "--val-docs", "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr == f"error: input file {tmp_path / 'missing.txt'} not found\n"
    assert not out.exists()


# -----------------------------------------------------------------------------
# download from a fake remote laid out like the HF repo


@pytest.fixture
def remote(tmp_path, sample_data):
    root = tmp_path / "remote"
    ds = root / "datasets" / "datasets" / "fineweb10B_sp1024"
    ds.mkdir(parents=True)
    src = Path(sample_data["data_path"])
    shutil.copy(src / "fineweb_val_000000.bin", ds / "fineweb_val_000000.bin")
    for i, part in enumerate(np.array_split(load_shard(src / "fineweb_train_000000.bin"), 3)):
        prepare.write_shard(ds / f"fineweb_train_{i:06d}.bin", part)
    tok = root / "datasets" / "tokenizers"
    tok.mkdir()
    shutil.copy(sample_data["tokenizer_path"], tok / "fineweb_1024_bpe.model")
    shutil.copy(Path(sample_data["tokenizer_path"]).with_suffix(".vocab"), tok / "fineweb_1024_bpe.vocab")
    manifest = {
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "path": "datasets/fineweb10B_sp1024",
                      "stats": {"files_val": 1, "files_train": 3}}],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
    }
    (root / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_download_from_local_remote(tmp_path, remote):
    out = tmp_path / "data"
    rc = prepare.main(["download", "--variant", "sp1024", "--train-shards", "2", "--repo-id", str(remote), "--out-root", str(out)])
    assert rc == 0
    ds, rds = out / "datasets" / "fineweb10B_sp1024", remote / "datasets" / "datasets" / "fineweb10B_sp1024"
    names = ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin", "manifest.json"]
    assert sorted(p.name for p in ds.iterdir()) == names
    for n in names[:3]:
        assert (ds / n).read_bytes() == (rds / n).read_bytes()
    assert sorted(p.name for p in (out / "tokenizers").iterdir()) == ["fineweb_1024_bpe.model", "fineweb_1024_bpe.vocab"]
    m = json.loads((ds / "manifest.json").read_text())
    assert m["source"] == f"download:{remote}" and m["tokenizer"]["path"] == str(out / "tokenizers" / "fineweb_1024_bpe.model")
    assert len(m["splits"]["train"]["shards"]) == 2 and prepare.verify(ds).startswith("ok")
    # again: valid files are skipped, a broken local file is fetched again
    val_stat = (ds / "fineweb_val_000000.bin").stat()
    (ds / "fineweb_train_000001.bin").write_bytes(b"")
    prepare.download("sp1024", 2, str(remote), out_root=out)
    after = (ds / "fineweb_val_000000.bin").stat()
    assert (after.st_ino, after.st_mtime_ns) == (val_stat.st_ino, val_stat.st_mtime_ns)
    assert (ds / "fineweb_train_000001.bin").read_bytes() == (rds / "fineweb_train_000001.bin").read_bytes()


@pytest.mark.parametrize("case", ["truncated", "zero_bytes"])
def test_download_rejects_a_bad_remote_shard(tmp_path, remote, case):
    bad = remote / "datasets" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-2] if case == "truncated" else b"")
    with pytest.raises(DataError, match=str(bad)):
        prepare.download("sp1024", 3, str(remote), out_root=tmp_path / "data")
    ds = tmp_path / "data" / "datasets" / "fineweb10B_sp1024"
    assert not (ds / "fineweb_train_000001.bin").exists() and not (ds / "manifest.json").exists()


def test_download_argument_errors(tmp_path, remote):
    with pytest.raises(ValueError, match="--train-shards 4 > 3"):
        prepare.download("sp1024", 4, str(remote), out_root=tmp_path / "data")
    with pytest.raises(ValueError, match="unknown variant"):
        prepare.download("byte260", 1, out_root=tmp_path / "data")
    with pytest.raises(DataError, match="no dataset fineweb10B_sp4096"):
        prepare.download("sp4096", 1, str(remote), out_root=tmp_path / "data")
    assert not (tmp_path / "data").exists()


# -----------------------------------------------------------------------------
# Hugging Face datasets (the json builder on a local file, offline)


def test_hf_pipeline_on_local_jsonl(tmp_path, sample_data, sp):
    docs = make_corpus(30, seed=7)
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"content": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = tmp_path / "ds"
    r = subprocess.run([sys.executable, "data/prepare.py", "hf", "json", "--data-files", str(f), "--text-field", "content",
                        "--max-docs", "25", "--tokenizer", sample_data["tokenizer_path"], "--val-docs", "5", "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"] == "hf:json" and (m["splits"]["val"]["docs"], m["splits"]["train"]["docs"]) == (5, 20)
    np.testing.assert_array_equal(split_stream(sp, out, "val")[1], stream_of(sp, docs[:5]))
    np.testing.assert_array_equal(split_stream(sp, out, "train")[1], stream_of(sp, docs[5:25]))


# -----------------------------------------------------------------------------
# the built-in sample


def test_sample_documents_cover_the_topics_in_order():
    from pydoc_data.topics import topics

    docs = prepare.sample_documents()
    paras = [p for k in sorted(topics) for p in prepare.split_text_documents(topics[k])]
    assert "\n\n".join(docs) == "\n\n".join(paras)
    assert all(len(d) <= 2000 or "\n\n" not in d for d in docs)  # only a single long paragraph exceeds the limit
    assert len(docs) > 100 and docs == prepare.sample_documents()


def test_sample_is_deterministic(tmp_path, sample_data, capsys):
    assert prepare.main(["sample", "--out-root", str(tmp_path)]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "val_bytes" in line
    first, again = Path(sample_data["data_path"]), tmp_path / "datasets" / "sample_sp512"
    files = sorted(p.name for p in first.glob("*.bin"))
    assert files == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    for n in files:
        assert (first / n).read_bytes() == (again / n).read_bytes()
    assert Path(sample_data["tokenizer_path"]).read_bytes() == (tmp_path / "tokenizers" / "sample_512_bpe.model").read_bytes()
    m1, m2 = (json.loads((p / "manifest.json").read_text()) for p in (first, again))
    assert m1.pop("tokenizer")["sha256"] == m2.pop("tokenizer")["sha256"] and m1 == m2
    assert m1["splits"]["val"]["docs"] == len(prepare.sample_documents()) // 10
    assert prepare.main(["sample", "--out-root", str(tmp_path)]) == 0  # prepared already: verified, kept
    assert "already prepared" in capsys.readouterr().out
    shard = again / "fineweb_val_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2] + b"\x00\x01")
    assert prepare.main(["sample", "--out-root", str(tmp_path)]) == 2  # a damaged copy is not silently reused
    assert prepare.main(["sample", "--out-root", str(tmp_path), "--force"]) == 0
    assert shard.read_bytes() == (first / "fineweb_val_000000.bin").read_bytes()


# -----------------------------------------------------------------------------
# the training-start integrity check (train_gpt.py calls prepare.check_dataset)


def test_check_dataset_catches_a_train_val_leak(tmp_path, sample_data, sp):
    docs = [f"document number {i} says {w}" for i, w in enumerate(["alpha", "beta", "gamma", "delta"] * 10)]
    val = stream_of(sp, docs[:20])
    clean = tmp_path / "clean.bin"
    prepare.write_shard(clean, stream_of(sp, docs[20:]))
    lines = prepare.check_dataset(tmp_path, sample_data["tokenizer_path"], 512, 1, val, [clean])
    assert any("val_docs_in_train=0/20" in ln for ln in lines)
    leaky = tmp_path / "leaky.bin"  # the #2127 failure: train built with fewer val docs, so it holds val
    prepare.write_shard(leaky, stream_of(sp, docs[8:]))
    with pytest.raises(DataError, match="12/20 val documents also occur .* train/val leak"):
        prepare.check_dataset(tmp_path, sample_data["tokenizer_path"], 512, 1, val, [leaky])


def test_check_dataset_against_the_manifest(tmp_path, sample_data):
    d = tmp_path / "d"
    shutil.copytree(sample_data["data_path"], d)
    val = np.concatenate([load_shard(f) for f in sorted(d.glob("fineweb_val_*.bin"))])
    train = sorted(d.glob("fineweb_train_*.bin"))
    tok = sample_data["tokenizer_path"]
    lines = prepare.check_dataset(d, tok, 512, 1, val, train)
    assert any(ln.startswith("dataset_manifest:") and "val_bytes:" in ln for ln in lines)
    with pytest.raises(DataError, match="manifest says"):
        prepare.check_dataset(d, tok, 512, 1, val[:-5], train)
    with pytest.raises(DataError, match="vocab_size/bos_id"):
        prepare.check_dataset(d, tok, 1024, 1, val, train)
    m = json.loads((d / "manifest.json").read_text())
    m["splits"]["train"]["shards"].append(dict(m["splits"]["val"]["shards"][0]))
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="both the train and val splits"):
        prepare.check_dataset(d, tok, 512, 1, val, train)
