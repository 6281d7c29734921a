"""Tokenize a corpus and pack it into zstd webdataset shards + manifest.json (same as `mamba-dist prepare`).

Run from a checkout (no install needed):
    python data/prepare.py builtin --out data/prepared/builtin --seq-len 2048
    python data/prepare.py 'corpus/**/*.jsonl.zst' --out /data/mycorpus --text-field content --workers 16
    python data/prepare.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for `import mamba_dist`

from mamba_dist.data.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
