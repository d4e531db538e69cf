"""ImageNet backbone weights from the Hugging Face Hub (``train.py --backbone_weights imagenet``),
through ``huggingface_hub``: its own cache (``HF_HUB_CACHE`` / ``HF_HOME``), revision pinning and
integrity checks. The repository, file and revision of each backbone are rows of the table.

``EFFICIENTDET_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``: only the Hub cache is used.
"""
from __future__ import annotations

import os

from ..errors import UserError
from .fetch import offline
from .table import load_table

INSTALL = 'pip install huggingface_hub safetensors'


def backbone_file(backbone: str) -> str:
    """Local path of the ImageNet weights of ``backbone`` ('efficientnet-b3', 'efficientnet-lite0' …),
    fetched into the Hub cache when missing. UserError in one line naming the repository, file and
    revision, and how to place the file by hand, when it cannot be had."""
    table = load_table()
    row = table.backbones.get(backbone)
    if row is None:
        raise UserError(f'--backbone_weights imagenet: no ImageNet weights are listed for {backbone} '
                        f'(in {table.path}); pass a file: --backbone_weights FILE')
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:
        raise UserError(f'--backbone_weights imagenet needs huggingface_hub and safetensors: {INSTALL}') from None
    url = f'https://huggingface.co/{row.repo}/resolve/{row.revision}/{row.file}'
    try:
        return hf_hub_download(row.repo, row.file, revision=row.revision, local_files_only=offline(),
                               cache_dir=os.environ.get('HF_HUB_CACHE') or None)
    except (OSError, ValueError, EntryNotFoundError) as e:  # HTTP, offline, not cached, unknown revision …
        why = ' '.join(str(e).split()) or type(e).__name__
        mode = 'the network is off and it is not in the Hugging Face cache' if offline() else why[:200]
        raise UserError(f'--backbone_weights imagenet: {row.repo}/{row.file} (revision {row.revision}) for {backbone} '
                        f'could not be had ({mode}); to place it by hand, download {url} and pass its path: '
                        '--backbone_weights FILE') from None
