"""``python -m mae_transfer.speed``: the speed benchmark (the same as ``mae-transfer bench-speed``)."""
import sys

from mae_transfer.speed.cli import main

sys.exit(main())
