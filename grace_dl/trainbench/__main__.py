"""``python -m grace_dl.trainbench`` = ``grace-dl bench-train``."""

import sys

from ..cli import main

sys.exit(main(["bench-train", *sys.argv[1:]]))
