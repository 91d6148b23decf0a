"""Config precedence (defaults < TOML < env < flags), unknown keys, bad types, CLI parsing."""
import subprocess
import sys

import pytest

from _util import ROOT

sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402


@pytest.fixture
def toml(tmp_path):
    def write(text: str):
        p = tmp_path / "c.toml"
        p.write_text(text)
        return str(p)

    return write


def test_precedence_defaults_toml_env_flags(toml):
    path = toml("num_layers = 4\nmodel_dim = 256\n")
    assert tg.load_config(None, {}, {})[0].num_layers == 9
    assert tg.load_config(path, {}, {})[0].num_layers == 4
    cfg, src = tg.load_config(path, {}, {"NUM_LAYERS": "5"})
    assert (cfg.num_layers, cfg.model_dim) == (5, 256) and src["num_layers"] == "env NUM_LAYERS"
    cfg, src = tg.load_config(path, {"num_layers": "6"}, {"NUM_LAYERS": "5"})
    assert cfg.num_layers == 6 and src["num_layers"] == "flag" and src["model_dim"] == path


def test_toml_tables_group_keys(toml):
    cfg, _ = tg.load_config(toml("[model]\nnum_layers = 3\n[optim]\nmatrix_lr = 0.02\n"), {}, {})
    assert (cfg.num_layers, cfg.matrix_lr) == (3, 0.02)


@pytest.mark.parametrize("text,needle", [
    ("num_layer = 4\n", "unknown config key 'num_layer'"),
    ("[model]\nmodel_dimm = 4\n", "did you mean 'model_dim'"),
    ("model_dim = 1.5\n", "not a valid int"),
    ("tie_embeddings = 'maybe'\n", "not a valid bool"),
    ("num_layers = [\n", "not valid TOML"),
])
def test_bad_toml(toml, text, needle):
    with pytest.raises(ValueError, match=needle):
        tg.load_config(toml(text), {}, {})


def test_bad_env_and_flag_values():
    with pytest.raises(ValueError, match="env NUM_LAYERS"):
        tg.load_config(None, {}, {"NUM_LAYERS": "nine"})
    with pytest.raises(ValueError, match="unknown config key 'warmup'"):
        tg.load_config(None, {"warmup": "3"}, {})
    with pytest.raises(ValueError, match="divisible by num_heads"):
        tg.load_config(None, {"model_dim": "500"}, {})
    bad = [({"num_cores": "10"}, "num_cores=10"), ({"num_loops": "1", "loop_start": "3", "loop_end": "9"}, "loop_start..loop_end"),
           ({"ve_layers": "9,12"}, "names a missing layer"), ({"smear": "v4"}, "smear must be one of none, v2, v3"),
           ({"num_loops": "2", "loop_start": "2", "loop_end": "6", "parallel_start": "5"}, "parallel_start must come after")]
    for over, needle in bad:
        with pytest.raises(ValueError, match=needle):
            tg.load_config(None, over, {})


def test_type_coercion():
    cfg, _ = tg.load_config(None, {"tie_embeddings": "0", "matrix_lr": "1e-2", "compile": "false"}, {"SEED": "7"})
    assert cfg.tie_embeddings is False and cfg.compile is False and cfg.matrix_lr == 0.01 and cfg.seed == 7


def test_parse_cli_forms():
    opts, over = tg.parse_cli(["--config", "a.toml", "--dry-run", "--num-layers=3", "--seed", "5", "--compile"])
    assert opts == {"config": "a.toml", "dry_run": True, "resume": None}
    assert over == {"num_layers": "3", "seed": "5", "compile": "1"}
    with pytest.raises(ValueError, match="needs a value"):
        tg.parse_cli(["--num_layers"])
    with pytest.raises(ValueError, match="unexpected argument"):
        tg.parse_cli(["configs/x.toml"])
    assert tg.parse_cli(["--artifact=a.ptz"], ("config", "artifact"))[0] == {"dry_run": False, "config": None, "artifact": "a.ptz"}
    with pytest.raises(ValueError, match="--artifact needs a value"):  # ttt_eval.py's form; a traceback before
        tg.parse_cli(["--artifact"], ("config", "artifact"))


def test_cli_user_error_is_one_line():
    p = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--config", str(ROOT / "configs/smoke.toml"), "--nmu_layers=3"],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "did you mean 'num_layers'" in p.stderr


def test_baseline_dry_run_param_count():
    p = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--config", str(ROOT / "configs/baseline.toml"), "--dry-run"],
                       capture_output=True, text=True, check=True)
    assert p.stdout.splitlines()[0] == "model_params:17059912"
    assert '"num_layers": 9' in p.stdout


def test_baseline_toml_equals_defaults():
    cfg, _ = tg.load_config(str(ROOT / "configs/baseline.toml"), {}, {})
    assert cfg == tg.config_class()()
