"""The inversion cache: an image inverted once is edited many times by id.

Ids are content-derived (sha256 of the image bytes, the inversion settings and the model's
identity), so the same upload with the same settings finds the same entry, and no request
ever names a file path. Entries are kept in memory, least recently used evicted past
``max_bytes``; with ``folder`` each is also written there as ``<id>.safetensors`` (the
:class:`engine.editing.Inversion` format, checksummed) and read back on a miss.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import threading
from pathlib import Path

import torch

ID = re.compile(r"^inv_[0-9a-f]{32}$")


def inversion_id(image_bytes: bytes, settings: dict, model_identity: str) -> str:
    h = hashlib.sha256(image_bytes)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(model_identity.encode())
    return "inv_" + h.hexdigest()[:32]


def nbytes(inv) -> int:
    tensors = [inv.x0, inv.latents, inv.timesteps, inv.source.context, inv.noise, *inv.extras.values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class InversionCache:
    def __init__(self, max_bytes: int = 2 << 30, folder: str | Path | None = None):
        self.max_bytes = max_bytes
        self.folder = Path(folder) if folder else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.entries: collections.OrderedDict[str, tuple[object, int]] = collections.OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def get(self, key: str):
        """The inversion with this id, or None (a malformed id is never looked up on disk)."""
        if not ID.match(key):
            return None
        with self._lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                self.hits += 1
                return self.entries[key][0]
        path = self.folder / f"{key}.safetensors" if self.folder is not None else None
        if path is not None and path.is_file():
            from ..editing import Inversion

            try:
                inv = Inversion.load(path)
            except ValueError:  # corrupted on disk: drop it, re-invert
                path.unlink(missing_ok=True)
            else:
                self.put(key, inv, persist=False)
                with self._lock:
                    self.hits += 1
                return inv
        with self._lock:
            self.misses += 1
        return None

    def put(self, key: str, inv, persist: bool = True) -> None:
        size = nbytes(inv)
        if self.max_bytes <= 0 and self.folder is None:
            return  # caching off
        with self._lock:
            if key in self.entries:
                self.bytes -= self.entries.pop(key)[1]
            self.entries[key] = (inv, size)
            self.bytes += size
            while self.bytes > self.max_bytes and len(self.entries) > 1:
                _, (_, s) = self.entries.popitem(last=False)
                self.bytes -= s
        if persist and self.folder is not None:
            inv.save(self.folder / f"{key}.safetensors")
