"""User-facing errors: one clear message, a non-zero exit, no traceback."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn, Optional


class UserError(Exception):
    """A mistake the user can fix (bad path, bad field, wrong weights …). The message names the
    file or field and says what to do."""


def run_cli(main: Callable[[], Optional[int]]) -> NoReturn:
    """Run a script's ``main``; user mistakes print ``error: …`` and exit 2, Ctrl+C exits 130."""
    try:
        code = main()
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        sys.exit(130)
    sys.exit(int(code or 0))
