# SPDX-License-Identifier: Apache-2.0
"""``python -m pyro_arm.sbn train ...``: the same as ``pyro-arm`` and ``python -m pyro_arm``."""

import sys

from pyro_arm.sbn.cli import main

if __name__ == "__main__":
    sys.exit(main())
