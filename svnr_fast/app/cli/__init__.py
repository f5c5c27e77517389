"""The `svnr` command line: one module per subcommand (denoise, demo, train, eval), plus `svnr info`."""
from __future__ import annotations

import argparse


def _info(args: argparse.Namespace) -> int:
    from ... import info
    info.main()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import demo, denoise, train
    from . import eval as eval_command

    parser = argparse.ArgumentParser(prog="svnr", description="SVNR: spatially-variant noise removal with diffusion")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="how svnr_fast was built and which backend serves each op here")
    info.set_defaults(run=_info)
    for command in (denoise, demo, eval_command, train):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
