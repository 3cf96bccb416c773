"""Subcommands of the ``mpvg`` command; each module defines ``add_parser(subparsers)`` (see ``mpvg_kernels.cli``)."""
