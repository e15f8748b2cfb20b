"""Put the per-card tables a GPU run returned where the launchers read them: ``fp8_deep/configs/<op>/<card>.json``.

``bench/gpu_check.sh`` copies every table its tuning stages wrote into the results as ``<card>_<op>_table.json``.
Each file names its own destination (its ``op`` and ``card`` fields); this script checks that it is a table the
launchers can read (the checks of ``fp8_deep.ops._tuned.load_table``), writes it, and says what changed.

    python tools/apply_tables.py RESULTS_DIR [...]       # every *_table.json under the folders (or files) given
    python tools/apply_tables.py RESULTS_DIR --dry-run   # say what would change, write nothing
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "fp8_deep" / "configs"


def _check(table: dict) -> str:
    """Why ``table`` is not a table the launchers read, or ''."""
    for key in ("op", "card", "entries"):
        if key not in table:
            return f"no {key!r} field"
    if not isinstance(table["op"], str) or not table["op"] or "/" in table["op"]:
        return f"op {table['op']!r} is not a folder name"
    if not isinstance(table["card"], str) or not table["card"] or "/" in table["card"]:
        return f"card {table['card']!r} is not a file name"
    for e in table["entries"]:
        for k in ("E", "N", "K", "rows"):
            if not (isinstance(e.get(k), int) and e[k] > 0):
                return f"entry {e}: {k} must be a positive int"
        if not isinstance(e.get("config"), str):
            return f"entry {e}: config must be a string"
    return ""


def _key(e: dict):
    return e["E"], e["N"], e["K"], e["rows"]


def apply(paths, configs: Path = CONFIGS, dry_run: bool = False) -> int:
    """Write every table found under ``paths`` into ``configs``; returns the number of files refused."""
    files = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*_table.json")) if p.is_dir() else [p]
    refused = 0
    for f in files:
        try:
            table = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            print(f"refused {f}: {exc}")
            refused += 1
            continue
        why = _check(table) if isinstance(table, dict) else "not a JSON object"
        if why:
            print(f"refused {f}: {why}")
            refused += 1
            continue
        dest = configs / table["op"] / f"{table['card']}.json"
        old = {}
        if dest.is_file():
            old = {_key(e): e["config"] for e in json.loads(dest.read_text()).get("entries", [])}
        new = {_key(e): e["config"] for e in table["entries"]}
        changed = sum(1 for k, v in new.items() if old.get(k) != v)
        print(f"{'would write' if dry_run else 'wrote'} {dest.relative_to(configs.parent.parent)}: "
              f"{len(new)} entries ({changed} new or changed, {len(set(old) - set(new))} dropped) from {f.name}")
        if not dry_run:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(json.dumps(table, indent=1, allow_nan=False) + "\n")
    if not files:
        print("no *_table.json found")
    return refused


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="result folders or table files")
    p.add_argument("--dry-run", action="store_true", help="say what would change, write nothing")
    p.add_argument("--configs", default=str(CONFIGS), help="the tables' root (default %(default)s)")
    args = p.parse_args(argv)
    return 1 if apply(args.paths, Path(args.configs), args.dry_run) else 0


if __name__ == "__main__":
    sys.exit(main())
