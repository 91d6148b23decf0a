"""CaseOps (`lossless_caps_caseops_v1`, PR #1855): a lossless, bijective case transform.

ASCII letters are lowercased and their case is written as four private-use operator characters, so
the tokenizer spends its vocabulary on lowercase pieces and the model pays for case in the loss.

encode, scanning left to right:
- A word is a maximal run of ASCII letters A-Z/a-z. Digits and every non-ASCII character (É, ß,
  CJK, emoji) break words and are copied unchanged: "123ABC" has the word "ABC", "ÉCOLE" has "COLE".
- all lowercase -> as is; two or more letters, all uppercase -> ALLCAPS + lowercase; an uppercase
  letter followed by one or more lowercase ones -> TITLE + lowercase; anything else (mixed case, a
  single capital such as "I") -> TITLE if the first letter is uppercase, the first letter lowercased,
  then each later letter lowercased with CAPNEXT before the ones that were uppercase:
  "iPhone" -> i<C>phone, "McDonald" -> <T>mc<C>donald, "I" -> <T>i, "NASAs" -> <T>n<C>a<C>s<C>as.
- Text that already contains an operator character (U+E001..U+E004) stays lossless by an escape
  rule: each such character is written as ESC + the character. Other private-use characters are
  ordinary non-letters and are copied. The byte sidecar counts an escaped operator as its 3 original
  UTF-8 bytes and the ESC, like every operator, as 0.

decode is the exact inverse, decode(encode(s)) == s for every string s, and it accepts only text that
encode can produce (no ASCII uppercase, operators only where encode puts them): a ValueError otherwise.
"""
from __future__ import annotations

import re

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = TITLE + ALLCAPS + CAPNEXT + ESC  # a CaseOps tokenizer reserves them at ids 4..7 (user-defined symbols)
NAME = "lossless_caps_caseops_v1"

_ENC = re.compile("[A-Za-z]+|[\ue001-\ue004]")
# an escaped operator | an optional TITLE/ALLCAPS and a word of lowercase letters, CAPNEXT marks inside | anything else encode never writes
_DEC = re.compile("\ue004([\ue001-\ue004])|([\ue001\ue002]?)((?:\ue003?[a-z])+)|([\ue001-\ue004A-Z])")
_UPPER_NEXT = re.compile("\ue003([a-z])")
_OPERATOR_UTF8 = re.compile(rb"\xee\x80[\x81-\x84]")  # U+E001..U+E004 in UTF-8


def _encode_word(w: str) -> str:
    if w.islower():
        return w
    low = w.lower()
    if len(w) >= 2 and w.isupper():
        return ALLCAPS + low
    if w[0].isupper() and w[1:].islower():  # "".islower() is False: a single capital takes the mixed path
        return TITLE + low
    return (TITLE if w[0].isupper() else "") + low[0] + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in w[1:])


def encode(text: str) -> str:
    return _ENC.sub(lambda m: ESC + m[0] if m[0] in OPERATORS else _encode_word(m[0]), text)


def _decode_match(m: re.Match) -> str:
    if m[1]:
        return m[1]
    if m[4] is not None:
        what = "an uppercase ASCII letter" if m[4].isalpha() else f"a stray operator U+{ord(m[4]):04X} (none may end a word or the text)"
        raise ValueError(f"not CaseOps text: {what} at offset {m.start()}")
    word = _UPPER_NEXT.sub(lambda k: k[1].upper(), m[3])
    if m[2] == ALLCAPS:
        return word.upper()
    return word[0].upper() + word[1:] if m[2] == TITLE else word


def decode(text: str) -> str:
    out = _DEC.sub(_decode_match, text)
    if encode(out) != text:  # e.g. ALLCAPS on one letter, TITLE inside a word: not something encode writes
        raise ValueError("not CaseOps text: operators in places encode never puts them (not a canonical encoding)")
    return out


def original_bytes(encoded: str) -> np.ndarray:
    """For each UTF-8 byte of the encoded text, the UTF-8 bytes of the original text that the character
    starting there stands for (0 on continuation bytes): operators and ESC 0, an escaped operator 3,
    everything else its own length. The sum is len(decode(encoded).encode())."""
    b = encoded.encode("utf-8")
    a = np.frombuffer(b, dtype=np.uint8)
    w = np.select([a < 0x80, a >= 0xF0, a >= 0xE0, a >= 0xC0], [1, 4, 3, 2], 0).astype(np.int64)
    literal = -1  # the byte offset of an operator that the ESC before it made literal
    for m in _OPERATOR_UTF8.finditer(b):
        if m.start() == literal:
            continue  # keeps its 3 bytes
        w[m.start()] = 0
        if m[0] == ESC.encode():
            literal = m.end()
    return w
