import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "data"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """The built-in sample dataset (vocab 512), built once per test session in a temp dir."""
    import prepare

    root = tmp_path_factory.mktemp("sample_data")
    prepare.build_sample(out_root=root, vocab_size=512)
    return {
        "data_path": str(root / "datasets" / "sample_sp512"),
        "tokenizer_path": str(root / "tokenizers" / "sample_512_bpe.model"),
        "vocab_size": 512,
    }


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from an empty dynamo cache: compiled code objects (GPT.forward, attention) are
    shared across tests, so without this the recompile limit (8) trips in whichever test comes later."""
    yield
    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()
