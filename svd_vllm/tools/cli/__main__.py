"""``python -m svd_vllm.tools.cli``: the ``svd-vllm`` command."""

import sys

from . import main

sys.exit(main())
