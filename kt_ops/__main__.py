"""``python -m kt_ops``: the same as the ``kt-sft`` command."""
import sys

from kt_ops.cli import main

sys.exit(main())
