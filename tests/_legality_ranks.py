"""Run by tests/test_legality.py under torchrun --nproc_per_node=2 (gloo): the legality check on the legal
modes, then on TTT with its gradient all-reduce removed; rank 0 writes the verdicts as JSON.
Usage: _legality_ranks.py DATA_PATH TOKENIZER_PATH OUT_JSON"""
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import awake_model, val_world, verdict_of, write_verdicts  # noqa: E402
from test_legality import LEGAL, TINY  # noqa: E402

import train_gpt as tg  # noqa: E402  (on the path through _util)


def main(data_path: str, tokenizer_path: str, out: str) -> None:
    cfg, tokens, tbytes = val_world(TINY, data_path, tokenizer_path)
    rt = tg.init_runtime(cfg)
    model = awake_model(cfg)  # seeded: the same weights on both ranks
    cases = {k: LEGAL[k] for k in ("sliding", "ttt_sgd", "ttt_adamw_freeze", "ttt_min_numel_zloss_doc")}
    cases["ttt_no_allreduce"] = dict(eval_mode="legal_ttt")
    verdicts = {}
    for name, changes in cases.items():
        model.cfg = dataclasses.replace(cfg, **changes)
        verdicts[name] = verdict_of(model.cfg, model, tokens, tbytes, rt, no_allreduce=name == "ttt_no_allreduce")
    write_verdicts(rt, out, verdicts)


if __name__ == "__main__":
    main(*sys.argv[1:])
