"""``python -m kvp_gym.cli ...``: the ``kvp-gym`` command line (torchrun starts ``-m kvp_gym.cli train`` this way).

Imports only kvp_gym.cli."""

import sys

from kvp_gym.cli import main

if __name__ == "__main__":
    sys.exit(main())
