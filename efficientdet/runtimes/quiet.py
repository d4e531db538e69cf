"""Silencing third-party tools that write straight to the process's file descriptors (absl
logs, progress bars, library-loading notes of the LiteRT converter, its interpreter and NNCF)."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator

from ..errors import UserError

__all__ = ['quiet_output']


@contextlib.contextmanager
def quiet_output() -> Iterator[None]:
    """Within the block, whatever is written to stdout / stderr (file descriptors 1 and 2, so
    native code's output too) and Python warnings go to a temporary file instead; on an error its
    last lines are added to the exception's message (UserErrors are left as they are)."""
    import warnings
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode='w+b') as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                yield
        except Exception as e:
            sys.stdout.flush()
            sys.stderr.flush()
            log.seek(0)
            tail = log.read().decode(errors='replace').strip().splitlines()[-5:]
            if tail and not isinstance(e, UserError):
                e.args = (f'{e.args[0] if e.args else e}\n' + '\n'.join(tail),) + tuple(e.args[1:])
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
