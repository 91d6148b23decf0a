"""Exact val_bpb: byte LUTs against SentencePiece's own decode, the formula, and eval_val end to end."""
import math
import sys

import numpy as np
import pytest
import torch

from _util import ROOT

sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

TEXTS = [
    "Hello world. The quick brown fox jumps over the lazy dog.",
    "  leading spaces,   runs   of    spaces\n\nand\tnewlines\r\n  trailing  ",
    "digits 1234567890 and 3.14159, 2**64 = 18446744073709551616",
    "non-ASCII: caf\u00e9, na\u00efve, \u00fcber, \u65e5\u672c\u8a9e, \u0440\u0443\u0441\u0441\u043a\u0438\u0439",
    "emoji and rare symbols: \U0001f600 \U0001f680 \u2603 \u00a7\u00b6 \u2581 (a literal U+2581)",
    "def f(x):\n    return x ** 2  # code with indentation",
    "",
]


@pytest.fixture(scope="module")
def sp(sample_data):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=sample_data["tokenizer_path"])


def lut_bytes(sp, ids_with_bos):
    luts = tg.build_byte_luts(sp, sp.vocab_size())
    a = np.asarray(ids_with_bos)
    return int(tg.target_bytes(a[:-1], a[1:], luts).sum())


@pytest.mark.parametrize("text", TEXTS)
def test_lut_sum_equals_decoded_utf8_length(sp, text):
    ids = sp.encode(text)
    assert lut_bytes(sp, [sp.bos_id()] + ids) == len(sp.decode(ids).encode("utf-8"))


def test_byte_fallback_is_exercised(sp):
    ids = sp.encode("\U0001f600\u65e5")
    assert any(sp.is_byte(i) for i in ids), "the test tokenizer must fall back to bytes on rare characters"
    assert lut_bytes(sp, [sp.bos_id()] + ids) == len(sp.decode(ids).encode("utf-8"))


def test_documents_in_a_stream_sum_separately(sp):
    """A BOS boundary suppresses the leading-space byte; the BOS target itself counts 0 bytes."""
    stream, want = [], 0
    for t in TEXTS:
        ids = sp.encode(t)
        stream += [sp.bos_id()] + ids
        want += len(sp.decode(ids).encode("utf-8"))
    assert lut_bytes(sp, stream) == want


def test_lut_works_on_torch_tensors(sp):
    luts_np = tg.build_byte_luts(sp, 600)  # a table larger than the vocab pads with 0-byte boundaries
    assert len(luts_np[0]) == 600 and luts_np[2][599] and luts_np[0][599] == 0
    luts = tuple(torch.from_numpy(a) for a in luts_np)
    ids = torch.tensor([sp.bos_id()] + sp.encode(TEXTS[0] + " " + TEXTS[3]))
    got = tg.target_bytes(ids[:-1], ids[1:], luts).sum().item()
    assert got == lut_bytes(sp, ids.tolist())


def test_bpb_formula_against_hand_computation():
    nll = np.array([2.0, 0.5, 1.25, 3.0])
    nbytes = np.array([3, 1, 0, 4])
    hand = (2.0 + 0.5 + 1.25 + 3.0) / (math.log(2) * 8)
    assert tg.bits_per_byte(nll.sum(), nbytes.sum()) == pytest.approx(hand, rel=1e-15)
    mean_form = (nll.mean() / math.log(2)) * (nll.size / nbytes.sum())
    assert abs(tg.bits_per_byte(nll.sum(), nbytes.sum()) - mean_form) < 1e-12


def test_eval_val_matches_independent_computation(sp):
    """eval_val (batched, windowed) == per-window log-softmax NLL over decode()-measured bytes."""
    docs = [sp.encode(t) for t in TEXTS[:6]] * 3 + [sp.encode(TEXTS[0] * 2)]  # the cut lands in ASCII text
    stream = []
    for d in docs:
        stream += [sp.bos_id()] + d
    T = 16
    stream = stream[: ((len(stream) - 1) // T) * T + 1]
    cfg, _ = tg.load_config(None, dict(vocab_size=str(sp.vocab_size()), num_layers="2", model_dim="32", num_heads="2",
                                       num_kv_heads="1", train_seq_len=str(T), val_batch_size=str(3 * T),
                                       virtual_world_size="1", autocast_dtype="fp32"), {})
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1)
    tgt_bytes = torch.from_numpy(tg.val_target_bytes(cfg, sp, np.array(stream)))
    loss, bpb = tg.eval_val(cfg, model, rt, torch.tensor(stream), tgt_bytes)

    nll_sum, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(stream) - 1, T):
            x = torch.tensor(stream[s : s + T])[None]
            y = torch.tensor(stream[s + 1 : s + T + 1])
            logp = torch.log_softmax(model(x)[0].double(), dim=-1)
            nll_sum -= logp[torch.arange(T), y].sum().item()
            n += T
    # bytes of the scored targets 1..N-1, measured by decoding each document piece
    nbytes, cur = 0, []
    for tok in stream[1:] + [sp.bos_id()]:
        if tok == sp.bos_id():
            nbytes += len(sp.decode(cur).encode("utf-8"))
            cur = []
        else:
            cur.append(tok)
    assert loss == pytest.approx(nll_sum / n, rel=1e-5)
    assert bpb == pytest.approx(nll_sum / (math.log(2) * nbytes), rel=1e-5)
