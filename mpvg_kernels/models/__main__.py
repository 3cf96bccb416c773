"""``python -m mpvg_kernels.models``: the parameter table of every registered model and PE mode."""

from __future__ import annotations

import sys

from .param_table import format_param_table, param_table


def main() -> int:
    """Print the Markdown parameter table."""
    print(format_param_table(param_table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
