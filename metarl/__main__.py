"""``python -m metarl`` (and ``torchrun --nproc-per-node N -m metarl train CONFIG``) runs the CLI."""
import sys

from .cli import main

sys.exit(main())
