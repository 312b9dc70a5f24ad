"""``python -m qlora_kernels``: the built-in default job, a short QLoRA finetuning run (a small
random-weight LLaMA learns the built-in instruction data; GPU when there is one, else CPU).
Takes every ``qlora-train`` option (``--help``). The 4-bit format self-check of earlier
releases is ``python -m qlora_kernels.check``.
"""

from .train.cli import main

raise SystemExit(main())
