"""argparse with the error contract, for every entry point: the launchers (``tagi_ds.cli``), ``python -m
tagi_ds.plan``, ``python -m tagi_ds.data``, ``python -m tagi_ds.diagnose``, the benchmarks.

It sits in ``runtime/``, below the work and the CLI, so that an entry point of a lower layer (the planner, the data
inspector) parses its flags without importing ``tagi_ds.cli`` (an upward import, and the old import cycle
``cli -> train/loop -> plan -> plan/cli -> cli``). Standard library and ``tagi_ds.config`` only: ``--help`` stays light.
"""

from __future__ import annotations

import argparse
import sys

from tagi_ds.config import ConfigError
from tagi_ds.runtime.preflight import check_argv

__all__ = ["HelpFormatter", "Parser", "add_set_flag"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each default stated once: ``(default: X)`` is added only where the help text does not already say
    ``default`` and there is a default to state (not None, False or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with the error contract: an error is one line ``<message>; see <prog> --help`` (no usage
    block), raised as ConfigError for :func:`guarded` to report once; arguments that are not valid UTF-8 are
    refused by flag."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        check_argv(args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        raise ConfigError(f"{message}; see {self.prog} --help")


def add_set_flag(
    p: argparse.ArgumentParser,
    help: str = "override any config field, e.g. --set hypernet.rank=16 "
    "loss.kl_weight=0.5 (every field: python -m tagi_ds.config)",
) -> None:
    """``--set KEY=VALUE ...``: one rule everywhere (launchers, ``python -m tagi_ds.data``, benchmarks): one flag
    takes several keys, and the flag may be repeated; all go to ``args.overrides`` in order."""
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=help)
