# SPDX-License-Identifier: Apache-2.0
"""``python -m pyro_arm train ...``: the ``pyro-arm`` command (:mod:`pyro_arm.sbn.cli`)."""

import sys

from pyro_arm.sbn.cli import main

if __name__ == "__main__":
    sys.exit(main())
