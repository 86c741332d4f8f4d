"""Shared command dispatch for ``python -m preprocess`` and ``python -m tokenizer_train``.

Each command is a module with ``add_arguments(parser)`` and ``run(args) -> int``; its
docstring is the command's ``--help`` text. A ``UserError`` (``motion_data.common.errors``) raised by
a command is printed as one line (exit 2); Ctrl-C is one line too (exit 130).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from motion_data.common.errors import UserError
from motion_data.common.static_filter import DEFAULT_FILTER
from motion_data.common.storage import set_storage_options

# the original plan's filter as a --filter default (docs/DESIGN.md: p95@0.04, min_keep 16)
DEFAULT_FILTER_SPEC = f"{DEFAULT_FILTER.metric}@{DEFAULT_FILTER.threshold:g}"


def dispatch(prog: str, description: str, commands: dict[str, tuple[str, str]], argv=None) -> int:
    if argv is None and not sys.argv[0].endswith("__main__.py"):  # a console script (pyproject.toml)
        prog = os.path.basename(sys.argv[0])
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules, parsers = {}, {}
    for name, (mod, help_) in commands.items():
        try:
            modules[name] = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a real missing dependency inside the module must surface
                raise
            continue
        p = sub.add_parser(name, help=help_, description=(modules[name].__doc__ or help_).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        modules[name].add_arguments(p)
        p.add_argument("--storage-options", metavar="JSON", default=None,
                       help="filesystem options for s3:// gs:// https:// paths, a JSON object passed to fsspec "
                            "(e.g. '{\"endpoint_url\": \"http://host:8333\"}'); credentials otherwise come from the "
                            "environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or ~/.aws; never printed")
        parsers[name] = p
    args, extra = parser.parse_known_args(argv)
    if extra:  # the command's own usage, not the top-level one (e.g. train --epochs 1)
        parsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        set_storage_options(args.storage_options)
        return int(modules[args.command].run(args) or 0)
    except UserError as e:  # the user's to fix: one line naming the path, no traceback
        print(f"{prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # commands that can resume catch it first and say how
        detail = f": {e}" if str(e) else ""  # a training stopped by a signal says where it saved
        print(f"{prog} {args.command}: interrupted{detail}", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))
