"""Regenerate the Python stubs of the .proto files in this folder (``make grpc-stubs``).

    .venv/bin/python -m serve.grpc_gen.generate            # rewrite the checked-in stubs
    .venv/bin/python -m serve.grpc_gen.generate --out DIR  # write them elsewhere (tests compare)

Runs ``grpc_tools.protoc`` (grpcio-tools, pinned in pyproject's ``test`` extra so the output is the same
everywhere), then makes two edits to its output, both for importability next to other V2 clients:

* the messages go into this package's own descriptor pool (:data:`serve.grpc_gen.POOL`) instead of
  protobuf's process-wide default pool: ``tritonclient.grpc`` and ``kserve`` register the same
  ``inference.*`` names from other files, and two such files in one pool refuse to load ("duplicate
  symbol 'inference.ServerLiveRequest'", kserve/kserve#3099). The wire format does not change;
* the ``*_pb2_grpc`` modules import their messages from ``serve.grpc_gen`` (protoc writes a top-level
  ``import``).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("grpc_predict_v2.proto", "health.proto")
PACKAGE = "serve.grpc_gen"
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("


def _rewrite(path: Path) -> None:
    text = path.read_text()
    if path.name.endswith("_pb2.py"):
        if _DEFAULT_POOL not in text:
            raise RuntimeError(f"{path.name}: protoc's output changed; {_DEFAULT_POOL!r} not found")
        text = text.replace("# @@protoc_insertion_point(imports)",
                            f"from {PACKAGE} import POOL\n# @@protoc_insertion_point(imports)", 1)
        text = text.replace(_DEFAULT_POOL, "POOL.AddSerializedFile(")
    elif path.name.endswith("_pb2_grpc.py"):
        text = re.sub(r"^import (\w+_pb2) as ", rf"from {PACKAGE} import \1 as ", text, flags=re.MULTILINE)
    path.write_text(text)


def generate(out: Path) -> list[Path]:
    """Write the stubs of :data:`PROTOS` into ``out``; returns the files written."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(["protoc", f"-I{HERE}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                            f"--grpc_python_out={tmp}", *(str(HERE / name) for name in PROTOS)])
        if code != 0:
            raise RuntimeError(f"protoc exited with {code}")
        written = []
        for produced in sorted(Path(tmp).iterdir()):
            _rewrite(produced)
            target = out / produced.name
            target.write_text(produced.read_text())
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the stubs (default: this package)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
