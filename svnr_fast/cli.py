"""The `svnr` command line. Each subcommand lives with the code it drives and registers itself here."""
from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    from . import info
    info.main()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svnr", description="SVNR: spatially-variant noise removal with diffusion")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="how svnr_fast was built and which backend serves each op here")
    info.set_defaults(run=_info)
    from .photo import add_demo_parser, add_denoise_parser
    add_denoise_parser(sub)
    add_demo_parser(sub)
    from .evaluate import add_eval_parser
    add_eval_parser(sub)
    from .train import add_parser as add_train_parser
    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
