"""The ``itlens`` command line: a thin layer over the Python API.

Exit codes (CONTRACT): 0 success, 2 bad input or usage (one line on stderr naming the file, line or
key, and field), 1 internal error. Imports of heavy modules happen inside commands so ``--help`` is
fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from itlens.errors import InputError

app = typer.Typer(
    name="itlens",
    help="A closer look at what instruction tuning does to a language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

@app.callback()
def _root() -> None:
    """A closer look at what instruction tuning does to a language model."""


SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set model.hidden_size=256 (repeatable).")


def _die(message: str, code: int) -> None:
    print(f"itlens: error: {message}", file=sys.stderr)
    raise SystemExit(code)


@app.command()
def version() -> None:
    """Print the itlens version and the versions of the stack it runs on."""
    from itlens.env_info import versions

    for k, v in versions().items():
        print(f"{k} {v}")


# ------------------------------------------------------------------------------------------------
# Commands are added below, one block per stage. Keep each block self-contained.
# ------------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: maps InputError to exit 2 and any other failure to exit 1."""
    # typer >= 0.2x vendors click (typer._click) and raises its own exception classes; match by name
    # so both the vendored and the plain-click versions are handled.
    try:
        rv = app(args=argv, standalone_mode=False)
    except InputError as e:
        _die(str(e), 2)
    except Exception as e:
        names = {c.__name__ for c in type(e).__mro__}
        if "ClickException" in names:  # usage errors
            e.show()  # type: ignore[attr-defined]
            raise SystemExit(2)
        if "Exit" in names:
            raise SystemExit(getattr(e, "exit_code", 0))
        if "Abort" in names:
            _die("aborted", 130)
        import traceback

        traceback.print_exc()
        _die(f"internal error: {type(e).__name__}: {e}", 1)
    except KeyboardInterrupt:
        _die("interrupted", 130)
    if isinstance(rv, int) and rv:
        raise SystemExit(rv)


if __name__ == "__main__":  # pragma: no cover
    main()
