"""What the three examples' command lines share: --quick or the README's scale, --widths, and where
the plot and the results go (--out, or the README's own files with --update-docs)."""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def add_output_options(ap: argparse.ArgumentParser, name: str, outputs: str, docs: str) -> None:
    """--out (where the plot and results go) or --update-docs (the README's own files, `docs`)."""
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="PATH",
                       help=f"folder for {outputs} (default out/{name}/ in the repository); a path ending in "
                            ".png names the plot itself, with the results beside it")
    where.add_argument("--update-docs", action="store_true",
                       help=f"write {docs}, the README's (not with --quick)")


def fill_scale(ap: argparse.ArgumentParser, args: argparse.Namespace, quick: dict, full: dict,
               what: str = "figure") -> None:
    """Options left unset take the --quick or the README's value; `args.width_list` from --widths."""
    if args.quick and args.update_docs:
        ap.error(f"--update-docs rewrites the README's {what}: run it at full scale, without --quick")
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.width_list = [int(w) for w in args.widths.split(",")]
    except ValueError:
        ap.error(f"--widths {args.widths}: expected comma-separated integers")


def output_paths(args: argparse.Namespace, name: str, docs_results: Path | None) -> tuple[Path, Path | None]:
    """(the plot, the results' stem: add .json or .md). --update-docs: docs/<name>.png and
    `docs_results`; --out X.png: X.png and X beside it; --out DIR (default out/<name>/): DIR/<name>.png
    and DIR/results."""
    if args.update_docs:
        return ROOT / "docs" / f"{name}.png", docs_results
    if args.out and args.out.endswith(".png"):
        return Path(args.out), Path(args.out).with_suffix("")
    folder = Path(args.out) if args.out else ROOT / "out" / name
    return folder / f"{name}.png", folder / "results"
