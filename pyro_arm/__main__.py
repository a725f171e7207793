# SPDX-License-Identifier: Apache-2.0
"""``python -m pyro_arm train ...``: the same as the ``pyro-arm`` command."""

import sys

from pyro_arm.cli import main

if __name__ == "__main__":
    sys.exit(main())
