"""``python -m qlora_kernels.train``: see ``--help``."""

from .cli import main

raise SystemExit(main())
