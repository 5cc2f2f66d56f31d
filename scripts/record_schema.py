"""docs/records.md's table of the record's columns, written from the record schema's field descriptions.

    python scripts/record_schema.py           # rewrite the table between the markers in docs/records.md
    python scripts/record_schema.py --check   # exit 1 if docs/records.md's table is not the schema's (the tests run it)

The descriptions live in one place, ``cifarbench.store.records``; the docs page holds their rendering
(``schema_markdown``) between START and END.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cifarbench.store.records import schema_markdown

START, END = "<!-- record-schema:start -->", "<!-- record-schema:end -->"
PAGE = Path(__file__).resolve().parent.parent / "docs" / "records.md"


def rewritten(page: str) -> str:
    """``page`` with the text between START and END replaced by the schema's table."""
    before, start, rest = page.partition(START)
    _, end, after = rest.partition(END)
    if not (start and end):
        raise ValueError(f"the markers {START} and {END} are missing")
    return f"{before}{START}\n{schema_markdown()}\n{END}{after}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if the page's table differs")
    parser.add_argument("--page", type=Path, default=PAGE, help=f"the Markdown page holding the table ({PAGE.name})")
    args = parser.parse_args(argv)
    text = args.page.read_text(encoding="utf-8")
    try:
        new = rewritten(text)
    except ValueError as e:
        print(f"{args.page}: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(
                f"{args.page}: the record schema table differs from cifarbench.store.records.SCHEMA; "
                "regenerate it with: python scripts/record_schema.py",
                file=sys.stderr,
            )
            return 1
        return 0
    args.page.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
