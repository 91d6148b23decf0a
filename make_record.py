"""make_record.py: reproduce seeds, build record folders from logs, test significance, validate.

  python make_record.py run --config configs/X.toml --seeds 42 314 999 [--nproc 8] [--set key=value ...]
                            [--eval-mode legal_ttt] [--dry-run]
  python make_record.py build --name NAME --track track_10min_16mb --logs logs/a.txt ... --seeds 42 314 999
                              [--github-id ID] [--reference 1.0810,1.0812 | --reference-folder DIR]
                              [--artifacts A.ptz ...] [--config X.toml] [--out records]
  python make_record.py validate FOLDER          (or --validate FOLDER)
  python make_record.py leaderboard records/     (or --leaderboard records/)

Everything here reads logs and files only: a record folder is derived from what the runs printed,
so the numbers in README.md and submission.json can always be re-checked against the shipped logs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZE_CAP = 16_000_000  # decimal bytes, code + artifact
TIME_CAP_S = 600.0  # training and evaluation, each separately
CODE_FILES = ("train_gpt.py", "quantize.py", "ttt_eval.py")
TRACKS = ("track_10min_16mb", "track_non_record_16mb")
LN2 = math.log(2.0)
SEP = "=" * 100
NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"

# -----------------------------------------------------------------------------
# Log parsing: our format and the official baseline / record-era formats.

SCORE_RE = re.compile(rf"^(?P<label>[A-Za-z][A-Za-z0-9_]*?)(?P<exact>_exact)? val_loss:(?P<loss>{NUM}) val_bpb:(?P<bpb>{NUM})(?P<rest>.*)$")
SOURCE_RE = re.compile(r"^# ===== source: (\S+) =====\n", re.M)
LINE_RES = {k: re.compile(v) for k, v in {
    "python": r"^Running Python (\S+)",
    "torch": r"^Running PyTorch (\S+)(?: cuda:(\S+))?",
    "gpu": r"^\|\s+\d+\s+((?:NVIDIA|Tesla)\S*(?: \S+)*?)\s{2,}\S+\s+\|",
    "config": r"^config:(\{.*\})\s*$",
    "sources": r"^config_sources:(.*)$",
    "fingerprint": r"^dataset_fingerprint:val_sha256=(\w+) val_tokens:(\d+)",
    "disjoint": r"^dataset_disjoint:val_docs_in_train=(\d+)/(\d+)",
    "params": r"^model_params:(\d+)",
    "world": r"^world_size:(\d+) grad_accum_steps:(\d+)(?: device:(\S+))?",
    "seed": r"^seed:(\d+)\s*$",
    "train": rf"^step:(\d+)/(\d+) train_loss:({NUM}) train_time:({NUM})ms step_avg:({NUM})ms",
    "val": rf"^step:(\d+)/(\d+) val_loss:({NUM}) val_bpb:({NUM})(?: train_time:({NUM})ms)?(?: step_avg:({NUM})ms)?",
    "stop": r"^stopping_early: wallclock_cap train_time:(\d+)ms",
    "calib": rf"^gptq_calibration:.*? time:({NUM})s train_time:({NUM})s total:({NUM})s",
    "model_raw": r"^Serialized model: (\d+) bytes",
    "model": r"^Serialized model (\S+): (\d+) bytes(.*)$",
    "code": r"^Code size: (\d+) bytes(?: \((.*)\))?",
    "total_raw": r"^Total submission size: (\d+) bytes",
    "total": r"^Total submission size (\S+): (\d+) bytes",
    "eval_start": r"^eval_start artifact:(\S+) bytes:(\d+) mode:(\S+) legality:(\S+)",
    "eval_legality": r"^eval_legality:(\S+) reason:(.*)$",
    "legality_check": r"^legality_check:(.*)$",
    "eval_phases": r"^eval_phases: (.*)$",
    "eval_wall": rf"^eval_wallclock:({NUM})s budget:({NUM})s verdict:(\S+)",
    "peak": r"^peak memory allocated: (\d+) MiB reserved: (\d+) MiB",
}.items()}


@dataclass
class Score:
    label: str  # without the _exact suffix
    loss: float
    bpb: float
    decimals: int  # of the printed bpb: sets the tolerance when checking a copy of it
    exact: bool
    section: int  # -1: written by training; i: the i-th eval_start section (ttt_eval.py)
    eval_ms: float | None = None


@dataclass
class RunLog:
    path: str
    text: str = ""
    sources: dict = field(default_factory=dict)
    python: str | None = None
    torch: str | None = None
    cuda: str | None = None
    gpus: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    config_sources: dict = field(default_factory=dict)
    seed_line: int | None = None
    fingerprint: str | None = None
    val_docs_leak: tuple | None = None
    params: int | None = None
    world_size: int | None = None
    device: str | None = None
    train: list = field(default_factory=list)  # (step, train_loss, train_time_ms, step_avg_ms)
    val: list = field(default_factory=list)  # (step, val_loss, val_bpb)
    step_avg_ms: float | None = None
    train_ms: float | None = None
    stopped_early: bool = False
    calib_s: float | None = None
    serialize_ms: float | None = None
    compressor: str | None = None
    artifact_bytes: int | None = None
    code_bytes: int | None = None
    code_detail: str = ""
    total_bytes: int | None = None
    scores: list = field(default_factory=list)
    evals: list = field(default_factory=list)  # one dict per eval_start section
    peak_mib: int | None = None

    @property
    def seed(self) -> int | None:
        if isinstance(self.config.get("seed"), int):
            return self.config["seed"]
        return self.seed_line

    @property
    def steps(self) -> int | None:
        return max((s[0] for s in self.train + self.val), default=None)

    @property
    def hardware(self) -> str:
        if self.gpus:
            names = sorted(set(self.gpus))
            return f"{len(self.gpus)}x{names[0]}" if len(names) == 1 else ", ".join(self.gpus)
        return "cpu" if self.device in (None, "cpu") else str(self.device)

    @property
    def eval_s(self) -> float | None:
        sc = self.score()
        if sc and sc.section >= 0 and self.evals[sc.section].get("wall_s") is not None:
            return self.evals[sc.section]["wall_s"]
        return sc.eval_ms / 1000 if sc and sc.eval_ms is not None else None

    def label_score(self, pattern: str, last: bool = True, section: int | None = None) -> Score | None:
        hits = [s for s in self.scores if s.exact and re.search(pattern, s.label) and (section is None or s.section == section)]
        return (hits[-1] if last else hits[0]) if hits else None

    def score(self, label: str | None = None) -> Score | None:
        """The run's score: legal_ttt > (illegal evals) > sliding > quantized_ttt > roundtrip, the last line
        of the best tier (official logs print their final score last, sometimes under a legacy label)."""
        if label:
            hits = [s for s in self.scores if s.label == label.removesuffix("_exact")]
            return hits[-1] if hits else None
        for exact in (True, False):  # a 4-decimal line only when no exact line exists at all
            for pat in SCORE_TIERS:
                hits = [s for s in self.scores if s.exact == exact and re.search(pat, s.label)]
                if hits:
                    return hits[-1]
        return None

    def pre_quant_bpb(self) -> float | None:
        avg = [s for s in self.scores if s.label == "post_average"]
        return avg[-1].bpb if avg else (self.val[-1][2] if self.val else None)

    def score_notes(self) -> list[str]:
        """Why a score might not be what its label says (seed-results.md section 7 item 6)."""
        sc, notes = self.score(), []
        if not sc:
            return notes
        same = [s.label for s in self.scores if s.exact and s.label != sc.label and abs(s.bpb - sc.bpb) < 1e-9]
        if same and "roundtrip" in sc.label:
            notes.append(f"{sc.label}_exact repeats the value of {same[0]}_exact (legacy label: it is that score)")
        rts = {s.label: s.bpb for s in self.scores if s.exact and "roundtrip" in s.label}
        if "roundtrip" in sc.label and len(set(rts.values())) > 1:
            notes.append(f"several roundtrip labels ({', '.join(rts)}) with different values: the last, {sc.label}_exact, "
                         "is used; official logs print their sliding/TTT score under final_int8_zlib_roundtrip_exact")
        if len({s.bpb for s in self.scores if s.exact and s.label == sc.label}) > 1:
            notes.append(f"{sc.label}_exact appears with different values: the last is used (choosing among repeated evals breaks C4)")
        return notes


SCORE_TIERS = (r"legal_ttt", r"^(multipass_min|prequant_ttt)$", r"^final_.*sliding_window", r"^quantized_ttt", r"^final_.*roundtrip")


def parse_log(path) -> RunLog:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        text = f.read()
    r = RunLog(path=str(path), text=text, sources=extract_sources(text))
    # code dumped at the top (ours or the official one) must not be read as log lines
    m = re.search(rf"^{SEP}\n(?=Running Python)", text, re.M)
    body = text[m.start():] if m else text
    section = -1
    for line in body.splitlines():
        line = line.rstrip("\r")
        if (s := SCORE_RE.match(line)) and not line.startswith("step:"):
            ms = re.search(rf"eval_time:({NUM})ms", s["rest"])
            r.scores.append(Score(s["label"], float(s["loss"]), float(s["bpb"]), len(s["bpb"].partition(".")[2]),
                                  bool(s["exact"]), section, float(ms[1]) if ms else None))
            continue
        for key, rx in LINE_RES.items():
            if g := rx.match(line):
                section = _apply(r, key, g, section)
                break
    for sc in r.scores:  # exact lines carry no eval_time: borrow it from the short line of the same label
        if sc.exact and sc.eval_ms is None:
            twin = [t for t in r.scores if not t.exact and t.label == sc.label and t.section == sc.section and t.eval_ms]
            sc.eval_ms = twin[-1].eval_ms if twin else None
    return r


def _apply(r: RunLog, key: str, g: re.Match, section: int) -> int:
    if key == "python":
        r.python = g[1]
    elif key == "torch":
        r.torch, r.cuda = g[1], g[2]
    elif key == "gpu":
        r.gpus.append(g[1].strip())
    elif key == "config":
        try:
            r.config = json.loads(g[1])
        except json.JSONDecodeError:
            pass
    elif key == "sources":
        r.config_sources = dict(re.findall(r"(\w+)=(env \w+|\S+)", g[1]))
    elif key == "fingerprint":
        r.fingerprint = g[1]
    elif key == "disjoint":
        r.val_docs_leak = (int(g[1]), int(g[2]))
    elif key == "params":
        r.params = int(g[1])
    elif key == "world":
        r.world_size, r.device = int(g[1]), g[3] or r.device
    elif key == "seed":
        r.seed_line = int(g[1])
    elif key == "train":
        r.train.append((int(g[1]), float(g[3]), float(g[4]), float(g[5])))
        r.train_ms, r.step_avg_ms = max(r.train_ms or 0.0, float(g[4])), float(g[5])
    elif key == "val":
        r.val.append((int(g[1]), float(g[3]), float(g[4])))
        if g[5]:
            r.train_ms = max(r.train_ms or 0.0, float(g[5]))
    elif key == "stop":
        r.stopped_early = True
    elif key == "calib":
        r.calib_s = float(g[1])
    elif key == "model_raw" and r.artifact_bytes is None:
        r.artifact_bytes = int(g[1])
    elif key == "model":  # the compressed artifact: it wins over the raw torch.save size
        r.artifact_bytes = int(g[2])
        if m := re.search(r"serialize_time:(\d+)ms", g[3]):
            r.serialize_ms = float(m[1])
        if m := re.search(r"compressor:(.+)$", g[3]):
            r.compressor = m[1].strip()
    elif key == "code":
        r.code_bytes, r.code_detail = int(g[1]), g[2] or ""
    elif key == "total_raw" and r.total_bytes is None:
        r.total_bytes = int(g[1])
    elif key == "total":
        r.total_bytes = int(g[2])
    elif key == "eval_start":
        r.evals.append({"artifact": g[1], "bytes": int(g[2]), "mode": g[3], "legality": g[4], "reasons": [], "check": None})
        return len(r.evals) - 1
    elif key == "eval_legality" and section >= 0:
        r.evals[section]["reasons"].append(f"{g[1]}: {g[2]}")
    elif key == "legality_check" and section >= 0:
        r.evals[section]["check"] = g[1].strip()
    elif key == "eval_phases" and section >= 0:
        r.evals[section]["phases"] = g[1].strip()
    elif key == "eval_wall" and section >= 0:
        r.evals[section].update(wall_s=float(g[1]), budget_s=float(g[2]), verdict=g[3])
    elif key == "peak":
        r.peak_mib = int(g[1])
    return section


def extract_sources(text: str) -> dict[str, str]:
    """train_gpt.py logs each code file as '# ===== source: NAME =====\\n' + text + '\\n'; the last one is
    followed by the 100-'=' separator. Returns the texts exactly as read (the first copy of each name)."""
    heads, out = list(SOURCE_RE.finditer(text)), {}
    for i, m in enumerate(heads):
        if i + 1 < len(heads):
            end = heads[i + 1].start()
        else:
            sep = text.find("\n" + SEP + "\n", m.end() - 1)
            end = sep + 1 if sep >= 0 else len(text)
        body = text[m.end():end]
        out.setdefault(m[1], body[:-1] if body.endswith("\n") else body)
    return out


def logged_code_sizes(detail: str) -> dict[str, int]:
    """'raw train_gpt.py:79624 quantize.py:41307' -> {name: bytes}; {} for packed counts."""
    return {} if not detail.startswith("raw") else {k: int(v) for k, v in re.findall(r"(\S+\.py):(\d+)", detail)}


# -----------------------------------------------------------------------------
# Statistics: Welch one-sided test in bpb, and the README rule (>= 0.005 nats at p < 0.01) in nats.


def tokens_per_byte(val_loss: float, val_bpb: float) -> float:
    """val_loss = NLL/tokens and val_bpb = NLL/(ln2 * bytes), so tokens/bytes = val_bpb * ln2 / val_loss."""
    return val_bpb * LN2 / val_loss


def bpb_to_nats(bpb: float, tpb: float) -> float:
    return bpb * LN2 / tpb


def nats_to_bpb(nats: float, tpb: float) -> float:
    return nats / LN2 * tpb


def welch(ours: list[float], ref: list[float], shift: float = 0.0) -> dict:
    """One-sided test that mean(ours) < mean(ref) - shift. A single reference value gets the one-sample
    test the 2026-03-18/19 records used. p is None (with a reason) where no test is defined."""
    from scipy import stats

    ref = [x - shift for x in ref]
    if len(ours) < 2:
        return {"t": None, "df": None, "p_value": None, "why": "needs >= 2 seeds of ours"}
    if len(ref) == 1:
        res = stats.ttest_1samp(ours, ref[0], alternative="less")
        kind, df = "one-sample t-test vs the reference value", len(ours) - 1
    else:
        va, vb = statistics.variance(ours) / len(ours), statistics.variance(ref) / len(ref)
        if va + vb == 0:
            return {"t": None, "df": None, "p_value": None, "why": "both samples have zero variance"}
        res = stats.ttest_ind(ours, ref, equal_var=False, alternative="less")
        kind = "Welch one-sided (ours < reference)"
        df = (va + vb) ** 2 / ((va ** 2 / (len(ours) - 1) if va else 0) + (vb ** 2 / (len(ref) - 1) if vb else 0))
    if not math.isfinite(float(res.pvalue)):
        return {"t": None, "df": None, "p_value": None, "why": "the test is undefined for these samples (zero variance)"}
    return {"t": float(res.statistic), "df": float(df), "p_value": float(res.pvalue), "test": kind}


def significance(our_bpb: list[float], our_tpb: list[float], ref_bpb: list[float], source: str,
                 alpha: float = 0.01, threshold_nats: float = 0.005) -> dict:
    """Both criteria, reported separately. Nats are per token of OUR tokenizer: tokens/byte is a property
    of the val set and tokenizer (not the model), so converting the reference with our ratio is exact
    for the same data and makes different tokenizers comparable through bpb."""
    tpb = statistics.fmean(our_tpb)
    ours_nats = [bpb_to_nats(b, t) for b, t in zip(our_bpb, our_tpb)]
    ref_nats = [bpb_to_nats(b, tpb) for b in ref_bpb]
    d_bpb = statistics.fmean(our_bpb) - statistics.fmean(ref_bpb)
    d_nats = statistics.fmean(ours_nats) - statistics.fmean(ref_nats)
    w, rule = welch(our_bpb, ref_bpb), welch(ours_nats, ref_nats, shift=threshold_nats)
    w["passes"] = w["p_value"] is not None and w["p_value"] < alpha
    rule.update(threshold_nats=threshold_nats, threshold_bpb=nats_to_bpb(threshold_nats, tpb),
                passes=bool(-d_nats >= threshold_nats and rule["p_value"] is not None and rule["p_value"] < alpha))
    return {"reference": ref_bpb, "reference_source": source, "alpha": alpha, "tokens_per_byte": tpb,
            "delta_bpb": d_bpb, "delta_nats": d_nats, "welch_bpb": w, "readme_rule": rule}


# -----------------------------------------------------------------------------
# run: train -> artifact -> eval for each declared seed, with the budget table after each.


def cmd_run(a) -> int:
    sets = []
    for s in a.set:
        k, eq, v = s.partition("=")
        if not eq or not k:
            return fail(f"--set {s!r}: expected key=value")
        sets.append((k.lstrip("-").replace("-", "_"), v))
    if any(k in ("seed", "run_id") for k, _ in sets):
        return fail("--set seed/run_id: the runner sets them from --seeds (run ids are <config stem>_seed<S>)")
    stem = Path(a.config).stem + (f"_{a.tag}" if a.tag else "")
    run_ids = {s: f"{stem}_seed{s}" for s in a.seeds}
    if not a.dry_run:
        if not Path(a.config).is_file():
            return fail(f"config {a.config} not found")
        taken = [f"logs/{rid}.txt" for rid in run_ids.values() if (Path("logs") / f"{rid}.txt").exists()]
        if taken:
            return fail(f"{taken[0]} already exists: logs are never overwritten (remove it or pass --tag)")
    flags = [f"--{k}={v}" for k, v in sets]
    done = []
    for seed, rid in run_ids.items():
        train = launcher(a.nproc, "train_gpt.py") + ["--config", a.config, f"--seed={seed}", f"--run_id={rid}"] + flags
        log = Path("logs") / f"{rid}.txt"
        if a.dry_run:
            art = f"runs/{rid}/final_model.{guess_scheme(a.config, sets)}.ptz"
            print(shlex.join(train))
            print(shlex.join(eval_command(a.nproc, art, a.config, a.eval_mode, flags)))
            continue
        if (rc := run_step(f"seed {seed}: training", train)) != 0:
            return rc
        r = parse_log(log)
        art = Path(r.config.get("out_dir") or Path("runs") / rid) / f"final_model.{r.config.get('quant_scheme', 'int8')}.ptz"
        if not art.is_file():
            return fail(f"seed {seed}: training finished but {art} does not exist")
        if (rc := run_step(f"seed {seed}: eval", eval_command(a.nproc, str(art), a.config, a.eval_mode, flags))) != 0:
            return rc
        r = parse_log(log)
        print("\n".join(budget_table(r)), flush=True)
        done.append((seed, r))
    if done:
        print(f"\n{len(done)} seed(s) done. Build the record folder with:\n  python make_record.py build --name NAME "
              f"--track track_non_record_16mb --config {a.config} --seeds {' '.join(map(str, a.seeds))} --logs "
              + " ".join(r.path for _, r in done))
    return 0


def launcher(nproc: int, script: str) -> list[str]:
    path = script if Path.cwd().resolve() == HERE else str(HERE / script)
    if nproc == 1:
        return [sys.executable, path]
    return ["torchrun", "--standalone", f"--nproc_per_node={nproc}", path]


def eval_command(nproc: int, artifact: str, config: str, mode: str, flags: list[str]) -> list[str]:
    return launcher(nproc, "ttt_eval.py") + ["--artifact", artifact, "--config", config, f"--eval_mode={mode}"] + flags


def guess_scheme(config: str, sets: list) -> str:
    """For --dry-run only (a real run reads quant_scheme from the training log): flag > env > TOML > default."""
    for k, v in reversed(sets):
        if k == "quant_scheme":
            return v
    if os.environ.get("QUANT_SCHEME"):
        return os.environ["QUANT_SCHEME"]
    try:
        import tomllib

        data = tomllib.loads(Path(config).read_text())
        flat = {k: v for t in data.values() if isinstance(t, dict) for k, v in t.items()} | data
        return str(flat.get("quant_scheme", "int8"))
    except (OSError, ValueError):
        return "int8"


def run_step(what: str, cmd: list[str]) -> int:
    print(f"$ {shlex.join(cmd)}", flush=True)
    try:
        rc = subprocess.run(cmd).returncode
    except OSError as e:
        rc = fail(f"{what} could not start ({e}): {shlex.join(cmd)}")
        return rc
    if rc != 0:
        fail(f"{what} failed with exit code {rc}: {shlex.join(cmd)}")
    return rc


def fmt(x, spec: str = ",", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def budget_table(r: RunLog) -> list[str]:
    sc, train_s, calib_s = r.score(), (r.train_ms or 0) / 1000, r.calib_s or 0.0
    ev = r.evals[sc.section] if sc and sc.section >= 0 else {}
    eval_s = r.eval_s
    eval_margin = None if eval_s is None else TIME_CAP_S - eval_s
    return [
        f"budget seed {r.seed} ({r.path})",
        f"  train          {train_s:10.1f} s    steps {r.steps}" + (" (stopped by the wallclock cap)" if r.stopped_early else ""),
        f"  calibration    {calib_s:10.1f} s    inside the clock: train+calibration {train_s + calib_s:.1f} s, margin {TIME_CAP_S - train_s - calib_s:.1f} s to {TIME_CAP_S:.0f} s",
        f"  serialize      {fmt(r.serialize_ms and r.serialize_ms / 1000, '10.1f', '         -')} s",
        f"  eval           {fmt(eval_s, '10.1f', '         -')} s    margin {fmt(eval_margin, '.1f')} s to {TIME_CAP_S:.0f} s"
        + (f" (verdict {ev['verdict']})" if ev.get("verdict") else ""),
        f"  artifact       {fmt(r.artifact_bytes):>10} bytes",
        f"  code           {fmt(r.code_bytes):>10} bytes",
        f"  total          {fmt(r.total_bytes):>10} bytes  margin {fmt(r.total_bytes and SIZE_CAP - r.total_bytes)} to {SIZE_CAP:,}",
        f"  score          " + (f"{sc.label}{'_exact' if sc.exact else ''} val_bpb:{sc.bpb} val_loss:{sc.loss}"
                                + (f" (mode {ev['mode']}, {ev['legality']})" if ev else "") if sc else "NO SCORE LINE"),
    ]


# -----------------------------------------------------------------------------
# build: a record folder from the logs only.


def cmd_build(a) -> int:
    if len(a.logs) != len(a.seeds) or len(set(a.seeds)) != len(a.seeds):
        return fail(f"{len(a.logs)} logs for {len(a.seeds)} declared seeds: give one log per distinct seed, in seed order")
    runs = []
    for seed, path in zip(a.seeds, a.logs):
        if not Path(path).is_file():
            return fail(f"seed {seed}: log {path} is missing")
        r = parse_log(path)
        missing = [w for w, ok in (("score line", r.score(a.score_label)), ("artifact size line", r.artifact_bytes),
                                   ("'Total submission size' line", r.total_bytes)) if not ok]
        if missing:
            return fail(f"seed {seed}: {path} is incomplete (no {', no '.join(missing)}): did the run or its eval finish?")
        if r.seed != seed:
            return fail(f"seed {seed}: {path} ran seed {r.seed}, not the declared {seed}")
        runs.append(r)
    code = runs[0].sources
    if "train_gpt.py" not in code:
        return fail(f"{runs[0].path} holds no '# ===== source: train_gpt.py =====' block: the code that ran cannot be shipped")
    for r in runs[1:]:
        if r.sources != code:
            names = sorted(n for n in set(code) | set(r.sources) if code.get(n) != r.sources.get(n))
            return fail(f"{r.path} ran different code than {runs[0].path} ({', '.join(names)}): a record is one code")
    scores = [r.score(a.score_label) for r in runs]
    comp = [compliance(r, sc) for r, sc in zip(runs, scores)]
    if a.track == "track_10min_16mb" and (bad := [r for r, c in zip(runs, comp) if c["legality"] != "legal"]):
        return fail(f"seed {bad[0].seed}: eval legality is '{comp[runs.index(bad[0])]['legality']}': not a record; use track_non_record_16mb")
    if over := [r for r in runs if r.total_bytes > SIZE_CAP]:
        return fail(f"seed {over[0].seed}: total {over[0].total_bytes:,} bytes is over the {SIZE_CAP:,}-byte cap")
    if a.artifacts and len(a.artifacts) != len(runs):
        return fail(f"{len(a.artifacts)} artifacts for {len(runs)} seeds: give one per seed, in seed order")
    for art, r in zip(a.artifacts or [], runs):
        if not Path(art).is_file() or Path(art).stat().st_size != r.artifact_bytes:
            return fail(f"seed {r.seed}: artifact {art} is missing or not the {r.artifact_bytes:,} bytes its log reports")
    sig = None
    if a.reference or a.reference_folder:
        try:
            ref, source = reference_scores(a.reference, a.reference_folder)
        except ValueError as e:
            return fail(str(e))
        sig = significance([s.bpb for s in scores], [tokens_per_byte(s.loss, s.bpb) for s in scores], ref, source,
                           a.alpha, a.threshold_nats)
    date = a.date or datetime.date.today().isoformat()
    folder = Path(a.out) / a.track / f"{date}_{re.sub(r'[^A-Za-z0-9._-]+', '_', a.name).strip('_')}"
    if folder.exists():
        return fail(f"{folder} already exists: record folders are never overwritten")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp", dir=folder.parent))
    try:  # everything goes into a sibling temp dir, then one rename: no half-written record folder
        write_record(tmp, a, runs, scores, comp, sig, date)
        if folder.exists():
            raise FileExistsError(f"{folder} appeared while building")
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {folder}")
    problems, notes = validate(folder)
    for line in [f"note: {n}" for n in notes] + [f"FAIL: {p}" for p in problems]:
        print(line)
    return 1 if problems else 0


def compliance(r: RunLog, sc: Score) -> dict:
    """Issue #1017 C1-C4 from the eval_start legality of the section that printed the score. A legal mode
    scores each token once, before any update (ttt_eval.py runs one left-to-right pass by construction);
    an illegal mode's reason names the conditions it breaks; official logs say nothing (None)."""
    ev = r.evals[sc.section] if sc.section >= 0 else None
    legality = ev["legality"] if ev else ("legal" if r.config and "roundtrip" in sc.label else "unknown")
    reasons = " ".join(ev["reasons"]) if ev else ""
    conds = {}
    for i, what in enumerate(("causal", "normalized", "score_before_update", "single_pass"), 1):
        conds[f"C{i}_{what}"] = (True if legality == "legal" else False if f"C{i}" in reasons else None)
    repeated = len({s.bpb for s in r.scores if s.exact and s.label == sc.label}) > 1
    if repeated:
        conds["C4_single_pass"] = False
    train_s = (r.train_ms or 0) / 1000 + (r.calib_s or 0)
    return {"legality": legality, "eval_mode": ev["mode"] if ev else sc.label, **conds,
            "train_under_600s": train_s <= TIME_CAP_S, "eval_under_600s": None if r.eval_s is None else r.eval_s <= TIME_CAP_S,
            "artifact_under_16mb": r.total_bytes <= SIZE_CAP,
            "no_val_in_training": None if r.val_docs_leak is None else r.val_docs_leak[0] == 0,
            "score_first_ttt": bool(ev and ev["mode"] == "legal_ttt"), "reasons": ev["reasons"] if ev else []}


def reference_scores(values: str | None, folder: str | None) -> tuple[list[float], str]:
    if values:
        try:
            return [float(x) for x in values.split(",") if x.strip()], "--reference " + values
        except ValueError:
            raise ValueError(f"--reference {values!r}: expected comma-separated bpb values") from None
    f = Path(folder)
    runs = [r for r in select_logs(f, None)[0].values() if r.score()]
    if runs:
        return [r.score().bpb for r in runs], f"{f} (score lines of {len(runs)} logs)"
    try:
        sub = json.loads((f / "submission.json").read_text())
        per = [v["val_bpb"] for v in (sub.get("seed_results") or {}).values() if isinstance(v, dict) and "val_bpb" in v]
        return (per, f"{f}/submission.json seed_results") if per else ([float(sub["val_bpb"])], f"{f}/submission.json val_bpb")
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"--reference-folder {f}: no scored logs and no usable submission.json") from None


def write_record(d: Path, a, runs: list, scores: list, comp: list, sig: dict | None, date: str) -> None:
    code = runs[0].sources
    for name, text in code.items():
        with open(d / name, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
    for r in runs:
        shutil.copyfile(r.path, d / f"train_seed{r.seed}.log")
    for art, r in zip(a.artifacts or [], runs):
        shutil.copyfile(art, d / re.sub(r"^final_model", f"final_model_seed{r.seed}", Path(art).name))
    if a.config:
        shutil.copyfile(a.config, d / Path(a.config).name)
    else:
        (d / "config.json").write_text(json.dumps(runs[0].config, indent=1, sort_keys=True) + "\n")
    if (HERE / "requirements.txt").is_file():
        shutil.copyfile(HERE / "requirements.txt", d / "requirements.txt")
    plots = write_plots(d, runs)
    sub = submission(a, runs, scores, comp, sig, date)
    (d / "submission.json").write_text(json.dumps(sub, indent=2) + "\n")
    (d / "README.md").write_text(record_readme(a, runs, scores, comp, sig, sub, plots))


def submission(a, runs, scores, comp, sig, date) -> dict:
    bpb, loss = [s.bpb for s in scores], [s.loss for s in scores]
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else None  # noqa: E731  (sample std, ddof=1)
    r0 = runs[0]
    seed_results = {str(r.seed): {
        "val_bpb": s.bpb, "val_loss": s.loss, "score_label": s.label + ("_exact" if s.exact else ""),
        "steps": r.steps, "step_avg_ms": r.step_avg_ms, "train_time_s": round((r.train_ms or 0) / 1000, 3),
        "calibration_s": r.calib_s, "eval_time_s": r.eval_s, "pre_quant_val_bpb": r.pre_quant_bpb(),
        "roundtrip_val_bpb": _bpb(r.label_score(r"^final_.*roundtrip", last=False)),
        "sliding_val_bpb": _bpb(r.label_score(r"^final_.*sliding_window")), "artifact_bytes": r.artifact_bytes,
        "bytes_code": r.code_bytes, "bytes_total": r.total_bytes, "eval_mode": c["eval_mode"], "legality": c["legality"],
        "log": f"train_seed{r.seed}.log"} for r, s, c in zip(runs, scores, comp)}
    flags = {k: all(c[k] for c in comp) if all(c[k] is not None for c in comp) else None
             for k in comp[0] if k not in ("legality", "eval_mode", "reasons")}
    return {
        "name": a.name, "github_id": a.github_id, "author": a.author or a.github_id, "track": a.track, "date": date,
        "blurb": a.blurb or "", "val_bpb": round(statistics.fmean(bpb), 8), "val_loss": round(statistics.fmean(loss), 8),
        "std": sd(bpb), "val_bpb_std": sd(bpb), "val_loss_std": sd(loss),
        "bytes_total": max(r.total_bytes for r in runs), "bytes_code": r0.code_bytes,
        "artifact_bytes_max": max(r.artifact_bytes for r in runs), "seeds": [r.seed for r in runs], "seed_results": seed_results,
        "hardware": r0.hardware, "versions": {"python": r0.python, "torch": r0.torch, "cuda": r0.cuda, "compressor": r0.compressor},
        "compliance": {"legality": sorted({c["legality"] for c in comp}), **flags, "three_seeds": len(runs) >= 3},
        "p_value": sig["welch_bpb"]["p_value"] if sig else None, "significance": sig,
        "dataset_fingerprint": r0.fingerprint, "generator": "make_record.py",
    }


def _bpb(s: Score | None) -> float | None:
    return s.bpb if s else None


def write_plots(d: Path, runs: list) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training box
    import matplotlib.pyplot as plt

    out = []
    for fname, ylabel, series in (("train_loss.png", "train loss", lambda r: [(s[0], s[1]) for s in r.train]),
                                  ("val_bpb.png", "val bpb", lambda r: [(s[0], s[2]) for s in r.val])):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for r in runs:
            pts = series(r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None, label=f"seed {r.seed}")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(d / fname)
        plt.close(fig)
        out.append(fname)
    return out


def repro_commands(r: RunLog, sc: Score) -> list[str]:
    """The commands that produced this log, rebuilt from config_sources: the TOML, then every key a flag
    or an environment variable set (as a flag), as make_record.py run passes them."""
    cfg = next((v for v in r.config_sources.values() if v != "flag" and not v.startswith("env ")), None)
    flags = [f"--{k}={_cli(r.config[k])}" for k, v in sorted(r.config_sources.items())
             if (v == "flag" or v.startswith("env ")) and k not in ("seed", "run_id") and k in r.config]
    n = r.world_size or 1
    pre = ["python"] if n == 1 else ["torchrun", "--standalone", f"--nproc_per_node={n}"]
    conf = ["--config", cfg] if cfg else []
    cmds = [shlex.join(pre + ["train_gpt.py"] + conf + [f"--seed={r.seed}", f"--run_id={r.config.get('run_id', '')}"] + flags)]
    if sc.section >= 0:
        ev = r.evals[sc.section]
        cmds.append(shlex.join(pre + ["ttt_eval.py", "--artifact", ev["artifact"]] + conf + [f"--eval_mode={ev['mode']}"] + flags))
    return cmds


def _cli(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _row(vals, spec):
    return [fmt(v, spec) for v in vals]


def record_readme(a, runs, scores, comp, sig, sub, plots) -> str:
    n, r0 = len(runs), runs[0]
    bpb = [s.bpb for s in scores]
    std = f", std {sub['std']:.5f}" if sub["std"] is not None else ""
    L = [f"# {a.name}", "", f"**val_bpb = {sub['val_bpb']:.8f}** ({n}-seed mean{std}) | **{sub['bytes_total']:,} bytes** (max over seeds) "
         f"| {sub['hardware']} | track `{a.track}` | {sub['date']}", ""]
    if a.blurb:
        L += [a.blurb, ""]
    labels = sorted({s.label + ("_exact" if s.exact else "") for s in scores})
    L += [f"Built by `make_record.py` from the logs only. Score line: `{', '.join(labels)}`"
          + (" (forced with --score-label)" if a.score_label else " (preference: legal_ttt > sliding window > quantized_ttt > roundtrip)") + ".", ""]
    cols = ["Seed", "Steps", "ms/step", "Train s", "Pre-quant bpb", "Roundtrip bpb", "Sliding bpb", "Final bpb", "Label",
            "val_loss", "Artifact B", "Code B", "Total B", "Eval s"]
    rows = []
    for r, s in zip(runs, scores):
        sr = sub["seed_results"][str(r.seed)]
        rows.append([r.seed, r.steps, r.step_avg_ms, sr["train_time_s"], sr["pre_quant_val_bpb"], sr["roundtrip_val_bpb"],
                     sr["sliding_val_bpb"], s.bpb, sr["score_label"], s.loss, r.artifact_bytes, r.code_bytes, r.total_bytes, r.eval_s])
    specs = [None, ",", ".2f", ".1f", ".4f", ".8f", ".8f", ".8f", None, ".8f", ",", ",", ",", ".1f"]
    L += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        L.append("| " + " | ".join(str(v) if sp is None else fmt(v, sp) for v, sp in zip(row, specs)) + " |")
    for what, f in (("**Mean**", statistics.fmean), ("**Std**", lambda xs: statistics.stdev(xs) if len(xs) > 1 else None)):
        cells = [what]
        for j, sp in enumerate(specs[1:], 1):
            col = [row[j] for row in rows]
            ok = sp is not None and j not in (11,) and all(isinstance(v, (int, float)) for v in col)
            cells.append(fmt(f(col), ".8f" if sp in (".8f", ".4f") and what == "**Std**" else sp) if ok else "")
        L.append("| " + " | ".join(cells) + " |")
    L += ["", "Std is the sample standard deviation (ddof=1). Train s is the training clock (compile, warmup and validation excluded).", ""]
    if sig:
        w, rule = sig["welch_bpb"], sig["readme_rule"]
        L += ["## Significance", "", f"Reference: {', '.join(f'{x:.8g}' for x in sig['reference'])} ({sig['reference_source']}).", "",
              f"- Delta vs reference: **{sig['delta_bpb']:+.6f} bpb**, **{sig['delta_nats']:+.6f} nats** per token "
              f"(nats = bpb x ln2 / tokens-per-byte, tokens/byte = {sig['tokens_per_byte']:.6f} from the logs' val_loss/val_bpb).",
              f"- {w.get('test', 'Welch')}: " + (f"t = {w['t']:.3f}, df = {w['df']:.2f}, p = {w['p_value']:.3g}" if w["p_value"] is not None
                                                 else f"not computed ({w['why']})") + f" -> {'passes' if w['passes'] else 'does not pass'} at p < {sig['alpha']}.",
              f"- README rule (improvement >= {rule['threshold_nats']} nats = {rule['threshold_bpb']:.5f} bpb at p < {sig['alpha']}): "
              + (f"t = {rule['t']:.3f}, p = {rule['p_value']:.3g}" if rule["p_value"] is not None else f"not computed ({rule['why']})")
              + f" -> **{'passes' if rule['passes'] else 'does not pass'}**.", ""]
    L += ["## Compliance", "", "| Seed | eval mode | legality | C1 causal | C2 normalized | C3 score before update | C4 single pass |", "|---|---|---|---|---|---|---|"]
    yn = {True: "yes", False: "**no**", None: "not logged"}
    for r, c in zip(runs, comp):
        L.append(f"| {r.seed} | {c['eval_mode']} | {c['legality']} | " + " | ".join(yn[c[k]] for k in c if k[:2] in ("C1", "C2", "C3", "C4")) + " |")
    L += ["", "C1-C4 are Issue #1017's conditions, read from each eval's `eval_start ... legality:` line: a legal mode scores every "
          "token exactly once, before the model is updated on it, in one left-to-right pass (by construction of ttt_eval.py)."]
    L += [f"- {r.seed}: {x}" for r, c in zip(runs, comp) for x in c["reasons"]]
    checks = sorted({r.evals[s.section]["check"] for r, s in zip(runs, scores) if s.section >= 0 and r.evals[s.section].get("check")})
    L += [f"- legality self-check: `{x}`" for x in checks]
    tmax = max((r.train_ms or 0) / 1000 + (r.calib_s or 0) for r in runs)
    evs = [r.eval_s for r in runs if r.eval_s is not None]
    L += ["", "Margins (worst seed):", "",
          f"- Training + GPTQ calibration: {tmax:.1f} s of {TIME_CAP_S:.0f} s (margin {TIME_CAP_S - tmax:.1f} s)"
          + ("" if all(r.calib_s is not None for r in runs) else "; no calibration line in some logs"),
          f"- Evaluation wallclock: " + (f"{max(evs):.1f} s of {TIME_CAP_S:.0f} s (margin {TIME_CAP_S - max(evs):.1f} s)" if evs else "not logged"),
          f"- Size: {sub['bytes_total']:,} bytes of {SIZE_CAP:,} (margin {SIZE_CAP - sub['bytes_total']:,} bytes)",
          f"- Validation documents inside the checked train shards: " + ", ".join(f"{r.val_docs_leak[0]}/{r.val_docs_leak[1]}" if r.val_docs_leak else "not logged" for r in runs)]
    notes = [f"{r.seed}: {x}" for r in runs for x in r.score_notes()]
    if notes:
        L += ["", "Score-line notes:", ""] + [f"- {x}" for x in notes]
    L += ["", "## Code", ""]
    sizes = logged_code_sizes(r0.code_detail)
    for name, text in r0.sources.items():
        b = text.encode("utf-8")
        here = HERE / name
        match = "matches the current checkout" if here.is_file() and here.read_bytes() == b else "differs from the current checkout" if here.is_file() else "not in the current checkout"
        logged = sizes.get(name)
        L.append(f"- `{name}`: {len(b):,} bytes, extracted byte-identical from the logs' source block; {match}"
                 + ("" if logged is None or logged == len(b) else f"; **the log's Code size line counted {logged:,} bytes: the file changed during the run**"))
    L += [f"- Code bytes counted: {r0.code_bytes:,} ({r0.code_detail or 'as logged'})", "",
          "## Reproduce", "", "From a checkout of this toolkit with the data prepared (`data/prepare.py`); each seed trains, then "
          "evaluates the artifact (the eval appends to the same log):", "", "```bash"]
    for r, s in zip(runs, scores):
        L += repro_commands(r, s)
    cfg = next((v for v in r0.config_sources.values() if v != "flag" and not v.startswith("env ")), "CONFIG.toml")
    sets = [f"{k}={_cli(r0.config[k])}" for k, v in sorted(r0.config_sources.items()) if (v == "flag" or v.startswith("env ")) and k not in ("seed", "run_id") and k in r0.config]
    modes = {c["eval_mode"] for c in comp}
    L += ["# or all seeds in one go:", shlex.join(["python", "make_record.py", "run", "--config", cfg, "--seeds", *map(str, sub["seeds"]),
          "--nproc", str(r0.world_size or 1)] + (["--eval-mode", modes.pop()] if len(modes) == 1 and comp[0]["eval_mode"] in EVAL_MODES else [])
          + (["--set", *sets] if sets else [])), "```", ""]
    L += ["## Files", "", "- `README.md`, `submission.json` (`val_bpb`/`val_loss` = mean over seeds, `bytes_total` = max over seeds)",
          "- " + ", ".join(f"`train_seed{r.seed}.log`" for r in runs) + ": the training logs with the eval lines appended",
          "- " + ", ".join(f"`{n}`" for n in r0.sources) + ": the code that ran",
          f"- `{Path(a.config).name if a.config else 'config.json'}`, `requirements.txt`, " + ", ".join(f"`{p}`" for p in plots),
          f"- Versions: Python {r0.python}, PyTorch {r0.torch}, compressor {r0.compressor or 'not logged'}; dataset fingerprint {r0.fingerprint or 'not logged'}", ""]
    return "\n".join(L)


EVAL_MODES = ("sliding", "legal_ttt", "multipass_min", "prequant_ttt")


# -----------------------------------------------------------------------------
# validate: any record folder, ours or the official repository's.

NUMBER, INT, TEXT = (int, float), (int,), (str,)
FIELDS = {  # name -> (accepted types, needed): needed by every folder / by ours (generator make_record.py)
    "name": (TEXT, "all"), "github_id": (TEXT, "all"), "val_bpb": (NUMBER, "all"), "bytes_total": (INT, "all"),
    "date": (TEXT, "all"), "val_loss": (NUMBER, "ours"), "bytes_code": (INT, "ours"), "track": (TEXT, "ours"),
    "seeds": ((list,), "ours"), "seed_results": ((dict,), "ours"), "std": (NUMBER + (type(None),), "ours"),
    "hardware": (TEXT, "ours"), "versions": ((dict,), "ours"), "compliance": ((dict,), "ours"),
    "p_value": (NUMBER + (type(None),), "ours"), "significance": ((dict, type(None)), "ours"),
    "author": (TEXT, ""), "blurb": (TEXT, ""), "val_bpb_std": (NUMBER + (type(None),), ""),
}


def find_logs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix == ".log" or
                  (p.suffix == ".txt" and p.name.lower().startswith(("train", "log")))))


def seed_from_name(name: str) -> int | None:
    m = re.search(r"seed_?(\d+)", name)
    return int(m[1]) if m else None


def select_logs(folder: Path, seeds: list | None) -> tuple[dict, list[str]]:
    """-> ({seed: RunLog}, notes): one log per seed, the seed read from the log (config or `seed:` line)
    before the file name; train_seed<S>.log wins over re-run variants of the same seed."""
    by_seed, notes = {}, []
    for p in find_logs(folder):
        r = parse_log(p)
        named = seed_from_name(p.name)
        if r.seed is not None and named is not None and named != r.seed:
            notes.append(f"{p.name}: the file name says seed {named} but the log ran seed {r.seed}")
        key = r.seed if r.seed is not None else named if named is not None else p.name
        by_seed.setdefault(key, []).append(r)
    chosen = {}
    for key, rs in by_seed.items():
        best = next((r for r in rs if Path(r.path).name in (f"train_seed{key}.log", "train.log")), rs[0])
        if len(rs) > 1:
            notes.append(f"{len(rs)} logs for seed {key} ({', '.join(Path(r.path).name for r in rs)}): {Path(best.path).name} is used")
        chosen[key] = best
    if seeds is not None:
        chosen = {k: v for k, v in chosen.items() if k in seeds}
    return chosen, notes


def _is(v, types) -> bool:
    return isinstance(v, types) and not (isinstance(v, bool) and bool not in types)


def _tol(values: list[float], scores: list[Score]) -> float:
    """5e-6 against 8-decimal exact lines, 5e-5 against 4-decimal ones; never tighter than the precision
    submission.json itself printed (at least 4 decimals are expected there)."""
    log_tol = 5e-6 if all(s.decimals >= 8 for s in scores) else 5e-5
    shown = [len(repr(float(v)).partition(".")[2]) for v in values if not repr(float(v)).count("e")]
    return max([log_tol] + [0.5 * 10.0 ** -max(d, 4) for d in shown]) + 1e-12


def validate(folder) -> tuple[list[str], list[str]]:
    """-> (problems, notes): a problem breaks the folder; a note says what could not be checked."""
    f, P, N = Path(folder), [], []
    if not f.is_dir():
        return [f"{f} is not a folder"], []
    P += [f"missing {n}" for n in ("README.md", "submission.json", "train_gpt.py") if not (f / n).is_file()]
    if not find_logs(f):
        P.append("no log file (*.log or train*.txt)")
    sub = {}
    if (f / "submission.json").is_file():
        try:
            sub = json.loads((f / "submission.json").read_text(encoding="utf-8"))
        except ValueError as e:
            P.append(f"submission.json is not valid JSON ({e})")
        if not isinstance(sub, dict):
            P.append("submission.json is not a JSON object")
            sub = {}
    ours = str(sub.get("generator", "")).startswith("make_record")
    for k, (types, need) in FIELDS.items():
        if k not in sub:
            if need == "all" or (need == "ours" and ours):
                P.append(f"submission.json: missing field '{k}'")
            elif k in ("val_loss", "bytes_code", "seeds"):
                N.append(f"submission.json has no '{k}': not checked")
        elif not _is(sub[k], types):
            P.append(f"submission.json: '{k}' is {type(sub[k]).__name__}, expected {' or '.join(t.__name__ for t in types)}")
    results = sub.get("seed_results") if isinstance(sub.get("seed_results"), dict) else {}
    seeds = sub.get("seeds") if isinstance(sub.get("seeds"), list) else ([int(k) for k in results if str(k).isdigit()] or None)
    logs, notes = select_logs(f, seeds) if f.is_dir() else ({}, [])
    N += notes
    for s in seeds or []:
        if s not in logs:
            P.append(f"declared seed {s} has no log")
    for key, r in logs.items():
        if not r.score():
            P.append(f"{Path(r.path).name}: no score line (legal_ttt_exact, final_*sliding_window*_exact, quantized_ttt*_exact or final_*_roundtrip_exact)")
        for note in r.score_notes():
            N.append(f"{Path(r.path).name}: {note}")
    scored = {k: r.score() for k, r in logs.items() if r.score()}
    if scored and len(scored) == len(logs):
        for fld, get in (("val_bpb", lambda s: s.bpb), ("val_loss", lambda s: s.loss)):
            if not _is(sub.get(fld), NUMBER):
                continue
            mean, tol = statistics.fmean(get(s) for s in scored.values()), _tol([sub[fld]], list(scored.values()))
            if abs(sub[fld] - mean) > tol:
                labels = sorted({s.label for s in scored.values()})
                P.append(f"submission.json {fld} {sub[fld]} does not match the mean of the logs' score lines, {mean:.8f} "
                         f"({', '.join(labels)} over {len(scored)} log(s), tolerance {tol:.1g})" + _other_label(logs, fld, sub[fld], tol))
        for key, res in results.items():
            r = logs.get(int(key)) if str(key).isdigit() else None
            if isinstance(res, dict) and r and r.score() and _is(res.get("val_bpb"), NUMBER):
                if abs(res["val_bpb"] - r.score().bpb) > _tol([res["val_bpb"]], [r.score()]):
                    P.append(f"seed_results[{key}].val_bpb {res['val_bpb']} != its log's {r.score().label} {r.score().bpb}")
    check_sizes(f, sub, logs, results, ours, P, N)
    if ours:
        for r in list(logs.values())[:1]:
            for name, text in r.sources.items():
                if not (f / name).is_file() or (f / name).read_bytes() != text.encode("utf-8"):
                    P.append(f"{name} is missing or differs from the code in {Path(r.path).name}")
    elif logs and not any(r.sources for r in logs.values()):
        N.append("the logs hold no '# ===== source:' blocks: the shipped code was not compared with the code that ran")
    return P, N


def _other_label(logs: dict, fld: str, value: float, tol: float) -> str:
    labels = set.intersection(*({s.label for s in r.scores if s.exact} for r in logs.values()))
    for lab in sorted(labels):
        vals = [getattr(r.score(lab), "bpb" if fld == "val_bpb" else "loss") for r in logs.values()]
        if abs(statistics.fmean(vals) - value) <= tol:
            return f"; it matches the mean of {lab}_exact instead"
    return ""


def check_sizes(f: Path, sub: dict, logs: dict, results: dict, ours: bool, P: list, N: list) -> None:
    total = sub.get("bytes_total") if _is(sub.get("bytes_total"), INT) else None
    if total is not None and total > SIZE_CAP:
        P.append(f"bytes_total {total:,} is over the {SIZE_CAP:,}-byte cap")
    logged = {k: r.total_bytes for k, r in logs.items() if r.total_bytes is not None}
    if total is not None and logged:
        if total < max(logged.values()):
            P.append(f"bytes_total {total:,} understates the logs' largest total, {max(logged.values()):,} (seed {max(logged, key=logged.get)})")
        elif total != max(logged.values()):
            N.append(f"bytes_total {total:,} is not the logs' largest total {max(logged.values()):,}")
    code = sum((f / n).stat().st_size for n in CODE_FILES if (f / n).is_file())
    if _is(sub.get("bytes_code"), INT) and sub["bytes_code"] != code:
        msg = f"bytes_code {sub['bytes_code']:,} != the shipped code files' {code:,} bytes"
        (P if ours else N).append(msg + ("" if ours else " (packed or wrapper counts are not checked)"))
    arts = sorted(f.glob("*.ptz"))
    if not arts:
        N.append("no artifact (*.ptz) in the folder: bytes_total not checked against code + artifact")
        return
    totals = {}
    for p in arts:
        seed = seed_from_name(p.name) if seed_from_name(p.name) is not None else (next(iter(logs)) if len(logs) == 1 else None)
        t = code + p.stat().st_size
        totals[seed] = t
        if t > SIZE_CAP:
            P.append(f"{p.name}: code + artifact = {t:,} bytes is over the {SIZE_CAP:,}-byte cap")
        res = results.get(str(seed)) if isinstance(results.get(str(seed)), dict) else {}
        if _is(res.get("bytes_total"), INT) and res["bytes_total"] != t:
            P.append(f"seed_results[{seed}].bytes_total {res['bytes_total']:,} != shipped code {code:,} + {p.name} {p.stat().st_size:,}")
    if total is not None:
        if set(totals) >= set(logs) and None not in totals and total != max(totals.values()):
            P.append(f"bytes_total {total:,} != shipped code {code:,} + largest artifact = {max(totals.values()):,}")
        elif total < max(totals.values()):
            P.append(f"bytes_total {total:,} is below shipped code + artifact = {max(totals.values()):,}")


# -----------------------------------------------------------------------------
# leaderboard


def cmd_leaderboard(a) -> int:
    rows = []
    for p in sorted(Path(a.root).rglob("submission.json")):
        try:
            sub = json.loads(p.read_text(encoding="utf-8"))
            bpb = float(sub["val_bpb"])
        except (OSError, ValueError, KeyError, TypeError):
            print(f"note: {p}: no readable val_bpb, skipped", file=sys.stderr)
            continue
        track = sub.get("track") or next((t for t in p.parts if t.startswith("track_")), "-")
        seeds = sub.get("seeds") if isinstance(sub.get("seeds"), list) else None
        rows.append((bpb, str(track), str(sub.get("name", p.parent.name)), ",".join(map(str, seeds)) if seeds else "-",
                     sub.get("bytes_total"), str(sub.get("date", "-"))[:10], str(p.parent)))
    if not rows:
        return fail(f"no submission.json under {a.root}")
    rows.sort(key=lambda r: r[0])
    head = ("#", "val_bpb", "track", "name", "seeds", "bytes_total", "date", "folder")
    table = [head] + [(str(i), f"{r[0]:.5f}", r[1], r[2], r[3], fmt(r[4]) if isinstance(r[4], int) else "-", r[5], r[6])
                      for i, r in enumerate(rows, 1)]
    w = [max(len(row[j]) for row in table) for j in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w[j]) for j, c in enumerate(row)).rstrip())
    return 0


def cmd_validate(a) -> int:
    problems, notes = validate(a.folder)
    for n in notes:
        print(f"note: {n}")
    for p in problems:
        print(f"FAIL: {p}")
    print(f"{'INVALID' if problems else 'OK'} {a.folder}" + (f": {len(problems)} problem(s)" if problems else ""))
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("--validate", "--leaderboard"):
        argv = [argv[0][2:]] + argv[1:]
    p = argparse.ArgumentParser(prog="make_record.py", description="Record folders from run logs.")
    sp = p.add_subparsers(dest="cmd", required=True)
    r = sp.add_parser("run", help="train + eval each declared seed, then print its budget table")
    r.add_argument("--config", required=True)
    r.add_argument("--seeds", type=int, nargs="+", required=True)
    r.add_argument("--nproc", type=int, default=8, help="processes per run (1: plain python, no torchrun)")
    r.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for train and eval")
    r.add_argument("--eval-mode", default="legal_ttt", choices=EVAL_MODES)
    r.add_argument("--tag", default="", help="run ids become <config stem>_<tag>_seed<S>")
    r.add_argument("--dry-run", action="store_true", help="print the commands only")
    b = sp.add_parser("build", help="a record folder from the logs")
    b.add_argument("--name", required=True)
    b.add_argument("--track", required=True, choices=TRACKS)
    b.add_argument("--logs", nargs="+", required=True)
    b.add_argument("--seeds", type=int, nargs="+", required=True)
    b.add_argument("--github-id", default="")
    b.add_argument("--author", default="")
    b.add_argument("--blurb", default="")
    ref = b.add_mutually_exclusive_group()
    ref.add_argument("--reference", help="comma-separated per-seed bpb of the record to beat")
    ref.add_argument("--reference-folder", help="a record folder: its logs' score lines (else its submission.json)")
    b.add_argument("--artifacts", nargs="+", help="one .ptz per seed, in seed order (copied into the folder)")
    b.add_argument("--config", help="the TOML the runs used (shipped; else config.json from the log)")
    b.add_argument("--out", default="records")
    b.add_argument("--date", help="YYYY-MM-DD (default: today)")
    b.add_argument("--score-label", help="use this score line instead of the preference order")
    b.add_argument("--alpha", type=float, default=0.01)
    b.add_argument("--threshold-nats", type=float, default=0.005)
    v = sp.add_parser("validate", help="check any record folder")
    v.add_argument("folder")
    lb = sp.add_parser("leaderboard", help="submission.json files under a folder, by val_bpb")
    lb.add_argument("root", nargs="?", default="records")
    a = p.parse_args(argv)
    return {"run": cmd_run, "build": cmd_build, "validate": cmd_validate, "leaderboard": cmd_leaderboard}[a.cmd](a)


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
