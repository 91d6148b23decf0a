"""make_record.py on the shapes official record folders really come in (specs/official-record-formats.md),
the leaderboard's validation, and the plots. Every fixture is a small folder written here."""
import json
import sys

import pytest

from _util import ROOT

sys.path.insert(0, str(ROOT))
import make_record as mr  # noqa: E402
from test_records import SEP, build_args, three_logs, write  # noqa: E402

SEEDS = (42, 314, 999)
BPB = {42: 1.08100000, 314: 1.08200000, 999: 1.08600000}  # mean 1.083
LOSS = {s: round(b * 2.5888, 8) for s, b in BPB.items()}
MEAN_BPB, MEAN_LOSS = 1.083, round(sum(LOSS.values()) / 3, 8)
CODE = 16594  # bytes of the shipped train_gpt.py
QUOTING = '"""A trainer. Its log ends like this:\nfinal_int8_zlib_roundtrip_exact val_loss:9.9 val_bpb:9.99999999\nseed:7\n"""\nimport os\n'


def olog(seed, tail, dump=False, code="import torch\nprint('x')\n", artifact=15_900_000) -> str:
    """An official log: the script printed first, the separator, then its lines. dump: the PR-era shape, a
    'Hyperparameters:' block (seed as '  seed: N') right after the separator; else the baseline's header."""
    head = ["Hyperparameters:", *([f"  seed: {seed}"] if seed is not None else []), "  train_seq_len: 2048"] if dump else \
        ["Running Python 3.11.10", "Running PyTorch 2.8.0", SEP, *([f"seed:{seed}"] if seed is not None else [])]
    return "\n".join([code.rstrip("\n"), SEP, *head, "step:100/20000 val_loss:2.9000 val_bpb:1.7000 train_time:1000ms step_avg:10.00ms",
                      f"Serialized model int6+brotli: {artifact} bytes", f"Code size: {CODE} bytes",
                      f"Total submission size int6+brotli: {artifact + CODE} bytes", *tail, ""])


def lines(label, seed, exact=True, pre="", eval_ms=True, bpb=None, loss=None):
    b, lo = BPB[seed] if bpb is None else bpb, LOSS[seed] if loss is None else loss
    return f"{label}{'_exact' if exact else ''} {pre}val_loss:{lo:.8f} val_bpb:{b:.8f}" + (" eval_time:412345ms" if eval_ms else "")


def folder(tmp_path, logs: dict, sub: dict, name="rec"):
    f = tmp_path / name
    for fname, text in logs.items():
        write(f / fname, text)
    write(f / "README.md", "# rec\n")
    write(f / "train_gpt.py", "x" * CODE)
    write(f / "submission.json", json.dumps(sub))
    return f


BASE = {"author": "a", "github_id": "a", "name": "n", "date": "2026-04-09", "track": "track_10min_16mb"}


def pr_era(tmp_path, **over):
    """2026-04-09 shape: no bytes_total (per-seed artifact_bytes), no val_loss, seeds list, quantized_* lines, a hyperparameter dump."""
    logs = {f"train_seed{s}.log": olog(s, [lines("quantized_sliding_window", s, False, bpb=BPB[s] + 0.002),
                                           lines("quantized_ttt", s, False)],
                                       dump=True) for s in SEEDS}
    sub = {**BASE, "val_bpb": MEAN_BPB, "val_bpb_std": 0.0026, "seeds": list(SEEDS), "hardware": "8xH100",
           "seed_results": {str(s): {"val_bpb": BPB[s], "artifact_bytes": 15_900_000, "steps": 4550} for s in SEEDS}}
    return folder(tmp_path, logs, {**sub, **over})


def seeds_dict(tmp_path):
    """2026-04-06_QK5 shape: seeds as a dict of per-seed results, mean_bpb beside val_bpb, legal_ttt_exact with an eval_time."""
    logs = {f"train_seed{s}.log": olog(s, [lines("quantized_sliding_window", s, False, bpb=BPB[s] + 0.002), lines("legal_ttt", s)])
            for s in SEEDS}
    return folder(tmp_path, logs, {**BASE, "val_bpb": MEAN_BPB, "bytes_total": 15_916_594, "blurb": "b", "mean_bpb": MEAN_BPB,
                                   "seeds": {str(s): {"val_bpb": BPB[s], "val_loss": LOSS[s]} for s in SEEDS}})


def mean_keys(tmp_path):
    """2026-03-19_SlidingWindow_FP16Emb_10L shape: mean_val_bpb / mean_val_loss, artifact_bytes + code_bytes, no github_id."""
    logs = {f"train_seed{s}.log": olog(s, [lines("final_int8_zlib_roundtrip", s, False), lines("final_int8_zlib_roundtrip", s)])
            for s in SEEDS}
    return folder(tmp_path, logs, {"track": "track_10min_16mb", "date": "2026-03-19", "name": "n", "author": "a", "p_value": 0.001,
                                   "seed_results": {str(s): {"val_bpb": BPB[s], "val_loss": LOSS[s]} for s in SEEDS},
                                   "mean_val_loss": MEAN_LOSS, "mean_val_bpb": MEAN_BPB, "artifact_bytes": 15_900_000, "code_bytes": CODE})


def lora_txt(tmp_path):
    """2026-03-17_LoRA_TTT shape: train_v*.txt logs without seeds; the claim is the 4-decimal final_ttt_lora mean."""
    logs = {f"train_v{i}.txt": olog(None, [lines("final_int8_zlib_roundtrip", s, eval_ms=False, bpb=1.2),
                                           f"final_ttt_lora val_loss:2.0000 val_bpb:{BPB[s]:.4f} eval_time:60000ms"])
            for i, s in enumerate(SEEDS)}
    return folder(tmp_path, logs, {**BASE, "blurb": "b", "val_loss": 2.0, "val_bpb": 1.0830, "bytes_total": 15_916_594, "bytes_code": CODE})


def seed_logs_stride(tmp_path):
    """2026-03-19_MixedQuant shape: seed*.log, the sliding score printed as 'final_sliding_window_eval_exact stride:64 val_loss:...'."""
    logs = {f"seed{s}.log": olog(s, [lines("final_int8_roundtrip", s, bpb=1.2),
                                     lines("final_sliding_window_eval", s, pre="stride:64 ", eval_ms=False)])
            for s in SEEDS}
    return folder(tmp_path, logs, {**BASE, "blurb": "b", "val_loss": MEAN_LOSS, "val_bpb": MEAN_BPB, "bytes_total": 15_916_594,
                                   "bytes_code": CODE})


def phased_quoting(tmp_path):
    """2026-04-14 shape: quantized_ttt_phased only, and logs that quote code holding a score line and a seed line."""
    logs = {f"train_seed{s}.log": olog(s, [lines("quantized_ttt_phased", s, False)], dump=True, code=QUOTING) for s in SEEDS}
    return folder(tmp_path, logs, {**BASE, "val_bpb": MEAN_BPB, "seeds": list(SEEDS),
                                   "seed_results": {str(s): {"val_bpb": BPB[s], "artifact_bytes": 15_900_000} for s in SEEDS}})


def single_run(tmp_path):
    """2026-03-18_FP16Embed shape: train.log (the claim) beside train_seed42.log, no seeds declared."""
    logs = {"train.log": olog(1337, [lines("final_int8_zlib_roundtrip", 42)]),
            "train_seed42.log": olog(42, [lines("final_int8_zlib_roundtrip", 42, bpb=1.09)])}
    return folder(tmp_path, logs, {**BASE, "blurb": "b", "val_loss": LOSS[42], "val_bpb": BPB[42], "bytes_total": 15_916_594,
                                   "bytes_code": CODE})


def reruns(tmp_path):
    """2026-04-29 shape: an original and a rerun log per seed; the claim is the reruns' mean."""
    logs = {f"train_seed{s}_{kind}.log": olog(s, [lines("quantized_ttt_phased", s, False, bpb=BPB[s] + d)], dump=True)
            for s in SEEDS for kind, d in (("original", 0.004), ("rerun_gptq8s", 0.0))}
    return folder(tmp_path, logs, {**BASE, "val_bpb": MEAN_BPB, "val_bpb_std": 0.0026, "seeds": list(SEEDS),
                                   "seed_results": {str(s): {"val_bpb": BPB[s]} for s in SEEDS}})


def code_v5(tmp_path):
    """2026-03-19_smeargate shape: train_gpt_v5.py (no train_gpt.py), one `seed`, artifact_size_bytes, no name, github_id,
    date or bytes_total."""
    tail = [lines("final_int8_roundtrip", 42, bpb=1.2), lines("final_sliding_window_eval", 42, pre="stride:64 ")]
    f = folder(tmp_path, {"train.log": olog(1337, tail)},
               {"val_bpb": BPB[42], "val_loss": LOSS[42], "seed": 1337, "artifact_size_bytes": 15_900_000, "train_steps": 7000})
    (f / "train_gpt.py").rename(f / "train_gpt_v5.py")
    return f


def logs_dir(tmp_path):
    """2026-04-10_VarLenAttn shape: the logs in a logs/ folder."""
    logs = {f"logs/run_{s}.txt": olog(s, [lines("quantized_ttt_phased", s, False)], dump=True) for s in SEEDS}
    return folder(tmp_path, logs, {**BASE, "val_bpb": MEAN_BPB, "val_loss": MEAN_LOSS, "seeds": list(SEEDS),
                                   "seed_results": {str(s): {"val_bpb": BPB[s]} for s in SEEDS}})


@pytest.mark.parametrize("make, note", [
    (code_v5, "no train_gpt.py: the code is train_gpt_v5.py"),
    (logs_dir, "missing field 'bytes_total': not checked"),
    (pr_era, "missing field 'bytes_total': not checked"),
    (seeds_dict, "no 'val_loss'"),
    (mean_keys, "'val_bpb' is absent: mean_val_bpb"),
    (lora_txt, "val_bpb 1.083 is the mean of final_ttt_lora"),
    (seed_logs_stride, "no artifact"),
    (phased_quoting, "no 'val_loss'"),
    (single_run, "val_bpb 1.081 is the score of train.log"),
    (reruns, "val_bpb 1.083 is the mean of quantized_ttt_phased over train_seed314_rerun_gptq8s.log, train_seed42_rerun_gptq8s.log, "
                "train_seed999_rerun_gptq8s.log"),
])
def test_validate_accepts_every_official_shape_with_notes(tmp_path, make, note):
    problems, notes = mr.validate(make(tmp_path))
    assert problems == [] and any(note in n for n in notes), (problems, notes)


def test_official_scores_are_read_from_their_own_lines(tmp_path):
    r = mr.parse_log(seed_logs_stride(tmp_path) / "seed42.log")
    assert (r.score().name, r.score().bpb, r.seed) == ("final_sliding_window_eval_exact", BPB[42], 42)
    r = mr.parse_log(phased_quoting(tmp_path / "q") / "train_seed314.log")  # the quoted code's lines are not log lines
    assert (r.score().name, r.score().bpb, r.seed) == ("quantized_ttt_phased", BPB[314], 314) and len(r.scores) == 1
    qualified = "final_int8_zlib_roundtrip sliding val_loss:1.5 sliding val_bpb:1.2345 eval_time:9ms"  # Random_Linear_Adapter
    r = mr.parse_log(write(tmp_path / "t.txt", olog(7, [qualified])))
    assert (r.score().label, r.score().bpb) == ("final_int8_zlib_roundtrip_sliding", 1.2345)


def _per_seed_over(f):
    sub = json.loads((f / "submission.json").read_text())
    sub["seed_results"]["314"]["artifact_bytes"] = 15_990_000
    (f / "submission.json").write_text(json.dumps(sub))


@pytest.mark.parametrize("make, edit, expect", [
    (pr_era, lambda f: _set(f, val_bpb=1.07), "val_bpb 1.07 does not match the mean"),
    (mean_keys, lambda f: _set(f, mean_val_bpb=1.07), "val_bpb 1.07 does not match the mean"),
    (pr_era, _per_seed_over, "seed_results[314]: artifact_bytes 15,990,000 + code 16,594 = 16,006,594 bytes is over the 16,000,000"),
    (mean_keys, lambda f: _set(f, artifact_bytes=15_990_000), "artifact_bytes 15,990,000 + code 16,594 = 16,006,594 bytes is over"),
    (pr_era, lambda f: write(f / "train_seed314.log", olog(314, [lines("quantized_ttt", 314, False)], dump=True, artifact=15_990_000)),
     "train_seed314.log: its total 16,006,594 bytes is over the 16,000,000-byte cap"),
    (single_run, lambda f: write(f / "train_seed42.log", olog(1337, [lines("final_int8_zlib_roundtrip", 42)])),
     "train_seed42.log: the file name says seed 42 but the log ran seed 1337"),
    (phased_quoting, lambda f: write(f / "train_seed42.log", olog(1337, [lines("quantized_ttt_phased", 42, False)], dump=True)),
     "train_seed42.log: the file name says seed 42 but the log ran seed 1337"),
])
def test_validate_fails_official_folders_only_on_contradictions(tmp_path, make, edit, expect):
    f = make(tmp_path)
    edit(f)
    problems, _ = mr.validate(f)
    assert any(expect in p for p in problems), problems


def _set(f, **kw):
    sub = json.loads((f / "submission.json").read_text())
    sub.update(kw)
    (f / "submission.json").write_text(json.dumps({k: v for k, v in sub.items() if v is not None}))


@pytest.mark.parametrize("edit, expect", [
    (dict(github_id=None), "missing field 'github_id'"),
    (dict(bytes_total="15979188"), "'bytes_total' is str, expected int"),
    (dict(val_bpb=True), "'val_bpb' is bool"),
])
def test_field_shapes_are_notes_on_official_folders_and_failures_on_ours(tmp_path, edit, expect):
    off = seeds_dict(tmp_path)
    _set(off, **edit)
    problems, notes = mr.validate(off)
    assert problems == [] and any(expect in n for n in notes), (problems, notes)
    assert mr.main(build_args(tmp_path, three_logs(tmp_path), [42, 314, 999])) == 0
    ours = tmp_path / "records" / "track_non_record_16mb" / "2026-04-01_Test_Rec"
    _set(ours, **edit)
    assert any(expect in p for p in mr.validate(ours)[0])


def test_a_claim_matching_another_label_is_a_note_on_official_folders(tmp_path):
    f = seeds_dict(tmp_path)
    _set(f, val_bpb=round(MEAN_BPB + 0.002, 8))  # the sliding lines' mean, not the preferred legal_ttt_exact
    problems, notes = mr.validate(f)
    assert problems == [] and any("is the mean of quantized_sliding_window over" in n for n in notes), (problems, notes)


# -----------------------------------------------------------------------------
# leaderboard


def test_leaderboard_ranks_only_valid_folders_and_lists_the_others_with_why(tmp_path, capsys):
    root = tmp_path / "records" / "track_10min_16mb"
    good, forged = pr_era(root, name="good"), seeds_dict(root / "x")
    _set(forged, val_bpb=0.9, name="forged")
    mean_keys(root / "y")  # ranked by its mean_val_bpb
    assert mr.main(["--leaderboard", str(tmp_path / "records")]) == 0
    out = capsys.readouterr().out
    ranked, _, invalid = out.partition("\nnot ranked")
    assert ranked.splitlines()[0].split()[:2] == ["#", "val_bpb"] and "forged" not in ranked
    assert [ln.split()[1] for ln in ranked.splitlines()[1:]] == ["1.08300", "1.08300"] and str(good) in ranked
    assert str(forged) in invalid and "val_bpb 0.9 does not match the mean" in invalid


# -----------------------------------------------------------------------------
# plots


def test_plots_show_the_final_score_integer_steps_and_the_final_evals(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    seen = {}
    real = Figure.savefig

    def capture(fig, path, *a, **kw):
        ax = fig.axes[0]
        seen[str(path).rsplit("/", 1)[-1]] = (ax.get_title(), ax.xaxis.get_major_locator(),
                                              {t.get_text() for t in ax.get_legend().get_texts()}, ax)
        return real(fig, path, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", capture)
    assert mr.main(build_args(tmp_path, three_logs(tmp_path), [42, 314, 999])) == 0
    for name in ("train_loss.png", "val_bpb.png"):
        title, loc, _, ax = seen[name]
        assert "4.43720" in title and "legal_ttt_exact" in title  # the 3-seed mean of the final score
        assert all(float(t).is_integer() for t in loc.tick_values(0, 2))
    _, _, legend, ax = seen["val_bpb.png"]
    assert {"roundtrip (final_mixed_brotli_roundtrip_exact)", "sliding (final_sliding_window_exact)", "final (legal_ttt_exact)"} <= legend
    final = [c for c in ax.collections if c.get_label() == "final (legal_ttt_exact)"][0].get_offsets()
    assert sorted(map(tuple, final.tolist())) == [(4.0, 4.4362), (4.0, 4.4372), (4.0, 4.4382)]
