"""``python -m sparsify``: the ``sparsify`` command (``torchrun --nproc-per-node 2 -m sparsify run ...`` runs it on
every rank, the model split over them by tensor parallelism)."""

import sys

from sparsify_cli import main

sys.exit(main())
