"""What a model folder says about itself beyond diffusers' files, and who it is.

``overpaint.json`` (optional, at the pipeline folder's root) carries a model's editing
recipes and vocabulary::

    {"format": "overpaint.model/1",
     "invert": {"ddpm": {"steps": 30, "guidance_scale": 3.5, ...}, ...},  # per inversion method
     "edit": {"p2p": {"guidance_scale": 7.5, ...}, ...},                   # per edit method
     "inversion_for": {"p2p": "ddpm"},      # the inversion an edit method's recipe starts from
     "generate": {"steps": 28, "guidance_scale": 3.0},  # generation defaults
     "ip_adapter": "ip_adapter/ip-adapter-plus.safetensors",  # a bundled IP-Adapter (relative path)
     "vocabulary": ["a", "red", ...]}       # words the model was trained on (None: any text)

``pipe.invert`` / ``pipe.edit`` and the CLI start from these defaults; what the user passes
wins. :func:`identity` names a model by its configs and its weights' headers, so an
inversion can tell which model made it.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from engine.loading.files import LoadError

CARD_FILE = "overpaint.json"
FORMAT = "overpaint.model/1"
SAMPLE_BYTES = 1 << 16  # of tensor data hashed at each end of a weights file


@dataclass
class ModelCard:
    invert: dict[str, dict] = field(default_factory=dict)
    edit: dict[str, dict] = field(default_factory=dict)
    inversion_for: dict[str, str] = field(default_factory=dict)
    vocabulary: list[str] | None = None
    generate: dict = field(default_factory=dict)
    ip_adapter: str | None = None  # the IP-Adapter shipped with the model, relative to its folder

    @classmethod
    def read(cls, root: Path) -> "ModelCard":
        """The card of the pipeline folder ``root`` (an empty one when it has none)."""
        path = Path(root) / CARD_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise LoadError(f"cannot read {path}: {e}; fix or delete the file") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = CARD_FILE) -> "ModelCard":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LoadError(f"{where}: expected a JSON object with \"format\": \"{FORMAT}\"")
        unknown = set(data) - {"format", "invert", "edit", "inversion_for", "vocabulary", "notes", "generate",
                               "ip_adapter"}
        if unknown:
            raise LoadError(f"{where}: unknown field(s) {sorted(unknown)}; this overpaint reads "
                            f"invert, edit, inversion_for, generate, ip_adapter, vocabulary, notes")
        ip = data.get("ip_adapter")
        if ip is not None and (not isinstance(ip, str) or Path(ip).is_absolute() or ".." in Path(ip).parts):
            raise LoadError(f"{where}: 'ip_adapter' must be a path inside the model folder")
        if not isinstance(data.get("generate", {}), dict):
            raise LoadError(f"{where}: 'generate' must be an object of parameters")
        for key in ("invert", "edit"):
            table = data.get(key, {})
            if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
                raise LoadError(f"{where}: {key!r} must map method names to parameter objects")
        vocab = data.get("vocabulary")
        if vocab is not None and not (isinstance(vocab, list) and all(isinstance(w, str) for w in vocab)):
            raise LoadError(f"{where}: 'vocabulary' must be a list of words")
        return cls(dict(data.get("invert", {})), dict(data.get("edit", {})), dict(data.get("inversion_for", {})),
                   vocab, dict(data.get("generate", {})), ip)

    def to_dict(self) -> dict:
        out = {"format": FORMAT, "invert": self.invert, "edit": self.edit, "inversion_for": self.inversion_for}
        if self.generate:
            out["generate"] = self.generate
        if self.ip_adapter:
            out["ip_adapter"] = self.ip_adapter
        if self.vocabulary is not None:
            out["vocabulary"] = self.vocabulary
        return out

    def unknown_words(self, prompt: str) -> list[str]:
        """The words of ``prompt`` outside the vocabulary (none when the model declares none)."""
        if self.vocabulary is None:
            return []
        known = {w.lower() for w in self.vocabulary}
        words = re.findall(r"[^\W_]+|[^\w\s]", prompt.lower())
        return list(dict.fromkeys(w for w in words if w not in known and w.isalnum()))


def _weights_digest(path: Path, h) -> None:
    """Feed a safetensors file's header (names, dtypes, shapes, offsets) and both ends of its
    data into ``h``: cheap for multi-GB files, and it tells fine-tunes of one base apart."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoadError(f"{path} is truncated (no safetensors header); re-download it")
        (n,) = struct.unpack("<Q", head)
        size = path.stat().st_size
        if n > size - 8:
            raise LoadError(f"{path} is truncated or corrupt (header of {n} bytes in a {size}-byte file); "
                            f"re-download it")
        h.update(head + f.read(n))
        h.update(f.read(SAMPLE_BYTES))
        f.seek(max(8 + n, size - SAMPLE_BYTES))
        h.update(f.read(SAMPLE_BYTES))


def identity(root: Path, model_index: dict) -> str:
    """A short hex id of the pipeline folder ``root``: its components' JSON configs and their
    weights' headers (plus a sample of each file's data), not their paths or file dates."""
    root = Path(root)
    h = hashlib.sha256()
    for name in sorted(k for k, v in model_index.items() if isinstance(v, (list, tuple))):
        folder = root / name
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.suffix == ".json" or p.name.endswith(".safetensors"):
                h.update(p.name.encode())
                if p.suffix == ".json":
                    h.update(p.read_bytes())
                else:
                    _weights_digest(p, h)
    return h.hexdigest()[:16]
