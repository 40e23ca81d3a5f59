"""Generate neuron/pb from protos/ with grpcio-tools: the only way that folder is written."""

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "neuron" / "pb"


def generate(out: Path = OUT) -> None:
    """Write the Python modules for every .proto under protos/ into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = ["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *sources]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Generated modules import each other as `neuron.v1...`; keep them importable as `neuron.pb.neuron.v1`.
    for py in out.rglob("*_pb2*.py"):
        text = py.read_text()
        py.write_text(text.replace("from neuron.v1 import", "from neuron.pb.neuron.v1 import"))
    for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
