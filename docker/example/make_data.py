"""Write the example job's inputs: a tiny random-init Llama teacher and a token array.

Run inside the worker image (``docker compose --profile example run --rm example-data``); it
writes ``<out>/teacher`` (a Hugging Face directory) and ``<out>/tokens.npy`` (512 x 64 int32).
"""

from __future__ import annotations

import sys
from pathlib import Path

from kdcache.worker.toy import make_tiny_teacher, make_tokens


def main(out: Path) -> None:
    make_tiny_teacher(out / "teacher", vocab_size=320, hidden_size=32, num_layers=2)
    make_tokens(out / "tokens.npy", n_rows=512, seq_len=64, vocab_size=320)
    print(f"example data written to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/data/example"))
