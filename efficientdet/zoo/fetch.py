"""A table row → a verified local file.

Files live in torch.hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``, the folder
``torch.hub.load_state_dict_from_url`` uses, so a file another library fetched is reused) under
the publisher's file name. A download goes through ``torch.hub.download_url_to_file`` (progress
bar, sha256 prefix check) into a temporary file beside the cache file; only a file that passed the
hash check, the size check (when the size is known) and the structure check (read with the safe
loader, tensors of the named variant) is renamed into place. A lock file beside the cache file
(``.NAME.lock``) makes one process per machine download while the others wait: no two writers,
and no reader ever sees a half-written file (they only see renamed, complete ones).

``EFFICIENTDET_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) never touches the network: a cached file is
used, a missing one is an error saying where to put it. ``EFFICIENTDET_WEIGHTS_MIRROR`` is a base
URL serving the publishers' file names (``$MIRROR/tf_efficientdet_d0_34-f153e0cf.pth``).
"""
from __future__ import annotations

import glob
import hashlib
import http.client
import os
import socket
import sys
import urllib.error
from typing import Callable, Iterator, Optional

import torch.hub
from filelock import FileLock, Timeout

from ..ckpt.layout import describe_coef, read_checkpoint
from ..errors import UserError
from .table import Entry

OFFLINE_ENV = 'EFFICIENTDET_OFFLINE'
MIRROR_ENV = 'EFFICIENTDET_WEIGHTS_MIRROR'
_TRUE = ('1', 'true', 'yes', 'on')
# seconds a stalled transfer may stay silent before it is given up (only when no socket timeout is set)
STALL_TIMEOUT_S = 60.0


def offline() -> bool:
    """Whether the network must not be used (``EFFICIENTDET_OFFLINE`` or ``HF_HUB_OFFLINE`` set true)."""
    return any(os.environ.get(k, '').strip().lower() in _TRUE for k in (OFFLINE_ENV, 'HF_HUB_OFFLINE'))


def cache_dir() -> str:
    """torch.hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``; ``~/.cache/torch/…`` by default)."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints')


def cache_path(entry: Entry, folder: Optional[str] = None) -> str:
    """Where ``entry``'s file is (or will be): ``folder`` (default: :func:`cache_dir`) / its file name."""
    return os.path.join(folder or cache_dir(), entry.file_name)


def source_url(entry: Entry) -> str:
    """The URL the file is fetched from: the mirror's when ``EFFICIENTDET_WEIGHTS_MIRROR`` is set."""
    mirror = os.environ.get(MIRROR_ENV, '').strip()
    return f'{mirror.rstrip("/")}/{entry.file_name}' if mirror else entry.url


def _by_hand(entry: Entry, dest: str) -> str:
    return f'to place it by hand, download {entry.url} and save it as {dest}'


def _lock(dest: str) -> FileLock:
    return FileLock(os.path.join(os.path.dirname(dest), f'.{os.path.basename(dest)}.lock'))


def _temporaries(dest: str) -> Iterator[str]:
    """Leftovers of interrupted downloads of ``dest`` (only the lock holder writes them)."""
    yield from glob.glob(glob.escape(os.path.join(os.path.dirname(dest), f'.{os.path.basename(dest)}.')) + '*.part*')


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def check_file(entry: Entry, path: str, hashed: bool = True, structure: bool = True) -> None:
    """UserError unless ``path`` is ``entry``'s file: its sha256 starts with the published prefix
    (``hashed``), it has the published size (when known), and (``structure``) it reads safely as a
    checkpoint whose tensors fit ``entry``'s variant."""
    if entry.size_bytes is not None and os.path.getsize(path) != entry.size_bytes:
        raise UserError(f'{os.path.getsize(path)} bytes, {entry.size_bytes} expected (an incomplete transfer)')
    if hashed and entry.sha256_prefix:
        digest = sha256_of(path)
        if not digest.startswith(entry.sha256_prefix):
            raise UserError(f'its sha256 is {digest[:16]}…, the published one starts with {entry.sha256_prefix}')
    if not structure:
        return
    try:
        found = read_checkpoint(path).candidates
    except UserError as e:
        raise UserError(str(e).replace(f'{path}: ', '', 1)) from None
    if entry.variant not in found:
        what = describe_coef(found) if found else 'of no EfficientDet variant'
        raise UserError(f'its tensors are {what}, not {entry.variant_name}')


def _download(entry: Entry, dest: str, progress: bool) -> None:
    """Fetch ``entry`` into ``dest`` (lock held): temp file, hash, size and structure check, rename."""
    url = source_url(entry)
    tmp = os.path.join(os.path.dirname(dest), f'.{os.path.basename(dest)}.{os.getpid()}.part')
    fail = f'{entry.name}: downloading {url} to {dest} failed'
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(STALL_TIMEOUT_S)
    try:
        if progress:
            print(f'downloading {entry.name} ({entry.variant_name}, {entry.source}) from {url} to {dest}',
                  file=sys.stderr)
        torch.hub.download_url_to_file(url, tmp, hash_prefix=entry.sha256_prefix, progress=progress)
        # torch.hub checked the hash while writing. A file without a published hash is read once here,
        # so that a wrong file never enters the cache; a hashed one is the publisher's file, read (and
        # its structure checked, ``zoo.open_weights``) when it is used, not twice
        check_file(entry, tmp, hashed=False, structure=not entry.sha256_prefix)
        os.replace(tmp, dest)
    except urllib.error.HTTPError as e:
        raise UserError(f'{fail}: HTTP {e.code} {e.reason}; {_by_hand(entry, dest)}') from None
    except urllib.error.URLError as e:
        raise UserError(f'{fail}: no connection ({e.reason}); {_by_hand(entry, dest)}') from None
    except (OSError, http.client.HTTPException) as e:
        what = str(e) or type(e).__name__
        raise UserError(f'{fail}: the transfer broke off ({what}); nothing was kept; {_by_hand(entry, dest)}') from None
    except RuntimeError as e:
        if 'hash' not in str(e):
            raise
        raise UserError(f'{fail}: the file\'s sha256 does not start with the published {entry.sha256_prefix} (an '
                        f'interrupted or altered transfer); nothing was kept; {_by_hand(entry, dest)}') from None
    except UserError as e:
        raise UserError(f'{fail}: the file is not the expected checkpoint ({e}); nothing was kept; '
                        f'{_by_hand(entry, dest)}') from None
    finally:
        if previous is None:
            socket.setdefaulttimeout(None)
        for leftover in [tmp, *_temporaries(dest)]:
            if os.path.exists(leftover):
                os.remove(leftover)


def fetch(entry: Entry, folder: Optional[str] = None, progress: bool = True,
          log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> str:
    """The local path of ``entry``'s file in ``folder`` (default: torch.hub's cache), downloading it
    first when it is not there (one process per machine; the others wait for it). UserError in one
    line naming the URL, the expected path and how to place the file by hand when it cannot be had."""
    dest = cache_path(entry, folder)
    if os.path.isfile(dest):
        return dest
    if offline():
        raise UserError(f'{entry.name}: not in the cache ({dest}) and the network is off ({OFFLINE_ENV} / '
                        f'HF_HUB_OFFLINE); {_by_hand(entry, dest)}, or fetch it ahead of time with '
                        f'python -m efficientdet.zoo get {entry.name}')
    lock = _lock(dest)
    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log(f'waiting for another process downloading {entry.file_name} to {os.path.dirname(dest)}')
            lock.acquire()
    except OSError as e:
        raise UserError(f'{entry.name}: cannot write to {os.path.dirname(dest)} ({e.strerror or e}); set TORCH_HOME '
                        f'to a writable folder, or {_by_hand(entry, dest)}') from None
    try:
        if not os.path.isfile(dest):  # another process may have fetched it meanwhile
            _download(entry, dest, progress)
    finally:
        lock.release()
    return dest


def remove_cached(path: str) -> None:
    """Delete a cached file under its lock (no process is writing it meanwhile)."""
    with _lock(path):
        if os.path.isfile(path):
            os.remove(path)


def discard(entry: Entry, path: str, reason: str) -> UserError:
    """Remove a cached file of ``entry`` that is not what it should be; the error to raise, saying so."""
    remove_cached(path)
    return UserError(f'{entry.name}: the cached file {path} is not the published checkpoint ({reason}); it was '
                     'removed from the cache: run again to download it afresh')
