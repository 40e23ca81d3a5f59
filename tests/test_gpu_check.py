"""The GPU check's preparation (scripts/gpu_wheels.py, scripts/gpu_check.sh), without a GPU or an index:
what the wheelhouse carries, and that the check script parses. `scripts/gpu_check.sh --cpu-smoke` runs it all
on the CPU (docs/gpu.md); the run on a lent GPU is the device tool's."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_wheelhouse_carries_what_the_device_lacks_and_never_torch():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_wheels.py"), "--list"], capture_output=True,
                          text=True, check=True)
    carried = dict(line.split("==") for line in done.stdout.split())
    # The generated gRPC code checks grpcio and protobuf at import; bittensor signs; loguru logs; the tests.
    assert {"grpcio", "protobuf", "grpcio-health-checking", "grpcio-reflection", "bittensor", "bittensor-core",
            "loguru", "gguf", "pytest", "pytest-asyncio"} <= set(carried)
    assert not {"torch", "numpy", "transformers", "tokenizers", "safetensors", "triton"} & set(carried)
    assert carried["grpcio"] == "1.85.1" and carried["protobuf"].startswith("7.")


def test_the_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)
