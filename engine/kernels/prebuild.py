"""Compile the fused CPU kernels into the installed package: `python -m engine.kernels.prebuild`.

The container image runs this in its builder stage (which has a compiler) so that its runtime
stage (which has none) loads them instead of falling back to the PyTorch reference kernels. Run it
from outside a source checkout, so that the installed package is the one imported.
"""

from __future__ import annotations

import logging
import sys

from engine.kernels import cpu

logger = logging.getLogger(__name__)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    library = cpu.prebuild()
    logger.info("built %s (best instruction set here: %s)", library, cpu.best_isa())
    return 0


if __name__ == "__main__":
    sys.exit(main())
