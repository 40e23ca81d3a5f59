"""The generated code in neuron/pb must be what scripts/codegen.py makes from protos/ today."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_the_protos(tmp_path):
    spec = importlib.util.spec_from_file_location("codegen", ROOT / "scripts" / "codegen.py")
    codegen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(codegen)
    codegen.generate(tmp_path)
    committed = ROOT / "neuron" / "pb"
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh == sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    stale = [str(p) for p in fresh if (tmp_path / p).read_bytes() != (committed / p).read_bytes()]
    assert not stale, f"neuron/pb is out of date with protos/ ({stale}): run python scripts/codegen.py"
