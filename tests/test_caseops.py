"""CaseOps data path (PR #1855): the case transform is lossless, the tokenizer reserves its operators, the
val byte sidecar holds the ORIGINAL text's bytes, shard names are strict, and val_bpb divides by those bytes."""
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from _util import CONFIG_ENV, ROOT, read_log, run_train

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))
import caseops  # noqa: E402
import prepare  # noqa: E402
import train_gpt as tg  # noqa: E402

T, A, C, E = caseops.TITLE, caseops.ALLCAPS, caseops.CAPNEXT, caseops.ESC
ADVERSARIAL = [
    "", "a", "A", "I", "I am", "iPhone", "McDonald", "NASAs", "NASA", "HTTPServer", "aBcDeF", "ABC def GHI", "x1Y2z3",
    "123ABC", "ÉCOLE", "straße STRASSE", "Ünïcödé ÀÉÎ", "日本語 ABC 中文", "Ω Ωmega ΣIGMA", "😀Emoji😀", "ＡＢＣ full-width ﬁ",
    T, A, C, E, E + E, T + "abc", "a" + C + "b", E + T + "X", "Word" + T + "Word", "\ue000\ue005\uf8ff private use",
    "  leading and trailing  \n\n", "\t\ttabs\r\nCRLF\r\n", "\x00NUL\x00", "a" * 3000 + "B", "Z" * 5000,
]


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory):
    """`prepare.py sample --caseops` into a temp dir (the CLI path, as a user runs it)."""
    root = tmp_path_factory.mktemp("caseops_data")
    assert prepare.main(["sample", "--caseops", "--out-root", str(root)]) == 0
    return {"root": root, "data_path": root / "datasets" / "sample_caseops_sp512",
            "tokenizer_path": root / "tokenizers" / "sample_512_bpe_caseops.model"}


def load_sp(path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def test_transform_examples_of_the_spec():
    assert caseops.encode("iPhone") == "i" + C + "phone"
    assert caseops.encode("McDonald") == T + "mc" + C + "donald"
    assert caseops.encode("I") == T + "i"
    assert caseops.encode("NASAs") == T + "n" + C + "a" + C + "s" + C + "as"
    assert caseops.encode("123ABC ÉCOLE") == "123" + A + "abc É" + A + "cole"
    assert caseops.encode("x" + T + "y") == "x" + E + T + "y"  # an operator already in the text is escaped


def test_transform_roundtrips_every_sample_document_and_adversarial_strings():
    from pydoc_data.topics import topics

    docs = list(topics.values()) + prepare.sample_documents() + ADVERSARIAL
    for d in docs:
        e = caseops.encode(d)
        assert caseops.decode(e) == d
        assert not re.search("[A-Z]", e)  # case lives only in the operators
        assert int(caseops.original_bytes(e).sum()) == len(d.encode("utf-8"))
    assert sum(caseops.encode(d) != d for d in docs) > 100  # the transform really rewrites the corpus


@pytest.mark.parametrize("bad", [A + "x", T + "1", "aB", C, E + "a", "a" + T + "b", A + "a" + C + "b", C + "a", T + "a" + C + "b", E])
def test_decode_refuses_what_encode_never_writes(bad):
    with pytest.raises(ValueError, match="not CaseOps text"):
        caseops.decode(bad)


def test_tokenizer_reserves_the_operators(caseops_data):
    sp = load_sp(caseops_data["tokenizer_path"])
    assert [sp.id_to_piece(i) for i in range(4, 9)] == list(caseops.OPERATORS) + ["<0x00>"]
    e = caseops.encode("The NASA iPhone " + T)
    ids = sp.encode(e, out_type=int)  # every operator is exactly one token of its own
    assert [ids.count(i) for i in range(4, 8)] == [e.count(c) for c in caseops.OPERATORS] == [2, 1, 1, 1]
    with pytest.raises(ValueError, match="--caseops"):  # a plain dataset with the CaseOps tokenizer
        prepare.check_caseops_tokenizer(sp, "t.model", False)


def split_docs(tokens, bos):
    starts = list(np.flatnonzero(tokens == bos)) + [tokens.size]
    return [(a, b) for a, b in zip(starts[:-1], starts[1:])]


def test_sidecar_sums_to_the_original_bytes_of_every_val_document(caseops_data):
    d = caseops_data["data_path"]
    m = prepare.read_manifest(d)
    side, tokens = (np.concatenate([tg.load_shard(f) for f in prepare.shards_on_disk(d, s)]) for s in ("val_bytes", "val"))
    docs = prepare.sample_documents()[: m["splits"]["val"]["docs"]]
    assert side.size == tokens.size and m["caseops"] and m["val_bytes"] == int(side[1:].sum())
    spans = split_docs(tokens, 1)
    assert len(spans) == len(docs)
    for (a, b), doc in zip(spans, docs):
        assert side[a] == 0 and int(side[a:b].sum()) == len(doc.encode("utf-8"))
    assert int(side.sum()) == sum(len(doc.encode("utf-8")) for doc in docs)
    assert sum(doc != doc.strip() for doc in docs) > 0  # leading/trailing whitespace occurs and is counted
    assert "CaseOps byte sidecar" in prepare.verify(d)


def test_sidecar_of_edge_documents(caseops_data, tmp_path):
    """Leading/trailing/collapsed whitespace, whitespace-only and empty documents, NFKC-folded and
    byte-fallback characters, literal operators: each document's entries sum to its UTF-8 length."""
    docs = ["  lead", "trail \n\n ", "   ", "", "a\u3000\u3000B\n\n\nC", "ＡＢ ﬁ ½ Ⅻ 😀 中文", T + E + " Mixed" + C, "x " * 50]
    docs = docs + ["Filler Document number %d." % i for i in range(20)]
    (tmp_path / "docs.jsonl").write_text("".join(__import__("json").dumps({"text": t}) + "\n" for t in docs))
    out = tmp_path / "edge"
    assert prepare.main(["text", str(tmp_path / "docs.jsonl"), "--tokenizer", str(caseops_data["tokenizer_path"]), "--caseops",
                         "--val-docs", "8", "--out", str(out)]) == 0
    side, tokens = (tg.load_shard(out / f"fineweb_{s}_000000.bin") for s in ("val_bytes", "val"))
    got = [int(side[a:b].sum()) for a, b in split_docs(tokens, 1)]
    assert got == [len(t.encode("utf-8")) for t in docs[:8]]
    assert side[1] >= 2 + 1  # the dropped leading "  " is counted on the document's first token


def test_strict_shard_names_ignore_the_sidecar_and_strays(caseops_data, tmp_path):
    d = tmp_path / "ds"
    shutil.copytree(caseops_data["data_path"], d)
    for stray in ("fineweb_val_000000.bin.bak", "fineweb_val_1.bin", "fineweb_val_extra_000001.bin"):
        (d / stray).write_bytes(b"x")
    assert [f.name for f in tg.shard_files(d, "val")] == ["fineweb_val_000000.bin"]
    assert [f.name for f in prepare.shards_on_disk(d, "val")] == ["fineweb_val_000000.bin"]
    assert [f.name for f in prepare.shards_on_disk(d, "val_bytes")] == ["fineweb_val_bytes_000000.bin"]


def test_verify_and_the_start_check_catch_a_changed_sidecar(caseops_data, tmp_path):
    d = tmp_path / "ds"
    shutil.copytree(caseops_data["data_path"], d)
    f = d / "fineweb_val_bytes_000000.bin"
    side = tg.load_shard(f)
    side[5] += 1  # one more byte in the denominator: a better-looking score
    prepare.write_shard(f, side)
    with pytest.raises(tg.DataError, match="byte sidecar"):
        prepare.verify(d)
    tokens = tg.load_val_stream(tg.shard_files(d, "val"), 512)
    with pytest.raises(tg.DataError, match="byte sidecar"):
        prepare.check_dataset(d, caseops_data["tokenizer_path"], 512, 1, tokens, tg.shard_files(d, "train"), 0)


def cfg_for(data_path, tokenizer_path, **over):
    return tg.config_class()(data_path=str(data_path), tokenizer_path=str(tokenizer_path), vocab_size=512, **over)


def test_target_bytes_are_the_sidecar_or_the_luts(caseops_data, sample_data):
    d, tok = caseops_data["data_path"], caseops_data["tokenizer_path"]
    tokens = tg.load_val_stream(tg.shard_files(d, "val"), 512)
    got = tg.val_target_bytes(cfg_for(d, tok, caseops_enabled=True), load_sp(tok), tokens)
    side = tg.load_shard(d / "fineweb_val_bytes_000000.bin")
    assert got.dtype == np.int32 and np.array_equal(got, side)
    luts = tg.build_byte_luts(load_sp(tok), 512)  # LUT bytes of the transformed text: a different denominator
    assert int(got[1:].sum()) != int(tg.target_bytes(tokens[:-1], tokens[1:], luts).sum())
    plain = tg.load_val_stream(tg.shard_files(sample_data["data_path"], "val"), 512)
    sp = load_sp(sample_data["tokenizer_path"])
    got = tg.val_target_bytes(cfg_for(sample_data["data_path"], sample_data["tokenizer_path"]), sp, plain)
    assert got[0] == 0 and np.array_equal(got[1:], tg.target_bytes(plain[:-1], plain[1:], tg.build_byte_luts(sp, 512)))


@pytest.mark.parametrize("case", ["sidecar_without_flag", "flag_without_sidecar", "sidecar_with_plain_tokenizer"])
def test_a_mismatch_is_one_data_error(caseops_data, sample_data, case):
    d, tok = caseops_data["data_path"], caseops_data["tokenizer_path"]
    cfg = {"sidecar_without_flag": cfg_for(d, tok),
           "flag_without_sidecar": cfg_for(sample_data["data_path"], sample_data["tokenizer_path"], caseops_enabled=True),
           "sidecar_with_plain_tokenizer": cfg_for(d, sample_data["tokenizer_path"], caseops_enabled=True)}[case]
    tokens = tg.load_val_stream(tg.shard_files(cfg.data_path, "val"), 512)
    with pytest.raises(tg.DataError, match="caseops_enabled") as e:
        tg.val_target_bytes(cfg, load_sp(cfg.tokenizer_path), tokens)
    assert "\n" not in str(e.value) and "--caseops" in str(e.value)


def exact(log: str, name: str) -> tuple[float, float]:
    m = re.search(rf"^{name}_exact val_loss:([\d.]+) val_bpb:([\d.]+)$", log, re.M)
    return float(m[1]), float(m[2])


def test_smoke_config_trains_and_scores_over_original_bytes(caseops_data, tmp_path):
    """configs/smoke_caseops.toml (shrunk to a few steps) trains and scores; the bpb denominator the scores
    imply equals the original val documents' UTF-8 bytes counted independently of the sidecar."""
    d, tok = caseops_data["data_path"], caseops_data["tokenizer_path"]
    args = ["--config", str(ROOT / "configs" / "smoke_caseops.toml"), f"--data_path={d}", f"--tokenizer_path={tok}", "--run_id=cs",
            "--iterations=3", "--warmup_steps=1", "--train_seq_len=64", "--train_batch_tokens=1024", "--val_loss_every=0",
            "--model_dim=32", "--num_heads=2", "--num_kv_heads=1"]
    run_train(args, tmp_path)
    log = read_log(tmp_path, "cs")
    tokens = tg.load_val_stream(tg.shard_files(d, "val"), 512)
    usable = (tokens.size - 1) // 64 * 64
    val_docs = prepare.sample_documents()[: prepare.read_manifest(d)["splits"]["val"]["docs"]]
    original = sum(len(t.encode("utf-8")) for t in val_docs)

    loss, bpb = exact(log, "final_int8_brotli_roundtrip")  # train_gpt: the usable windows only
    side = tg.load_shard(d / "fineweb_val_bytes_000000.bin")
    assert round(loss * usable / (bpb * math.log(2))) == int(side[1 : usable + 1].sum())
    assert f"val_bytes:{int(side[1 : usable + 1].sum())} from:caseops_sidecar" in log
    art = next((tmp_path / "runs" / "cs").glob("final_model.*.ptz"))
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_ENV} | {"OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "ttt_eval.py"), "--artifact", str(art), "--eval_stride=64", "--run_id=cs"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    loss, bpb = exact(read_log(tmp_path, "cs"), "final_sliding_window")  # every target 1..N-1
    assert round(loss * (tokens.size - 1) / (bpb * math.log(2))) == original

    p = run_train(args + ["--run_id=off", "--caseops_enabled=false"], tmp_path, check=False)  # CaseOps data scored with LUTs: refused
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "caseops_enabled=False" in p.stderr
