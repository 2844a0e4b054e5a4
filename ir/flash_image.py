"""The flash image: streamed feed-forward weights laid out for flash reads, its manifest, and the activation
predictor (LLM in a flash, arXiv 2312.11514). The compiler writes it (``hetflow.backends.flash``, after the
tile_flash pass); the runtime reads it (``hetflow.runtime.flash_stream``, the ``flash`` runner).

One file holds the streamed FFN layers one after another; ``FlashImage`` (its manifest, JSON) says where each
layer is and how it is laid out. A layer of ``neurons`` neurons over ``hidden`` inputs, its weights ``up``
[hidden, neurons] (and ``gate`` for a gated FFN) and ``down`` [neurons, hidden]:

* bundled (row-column bundling): neuron i's bundle is up[:, i], gate[:, i], down[i, :] side by side, so one
  read fetches all of a neuron. Bundles of ``chunk_neurons`` consecutive neurons make a chunk.
* unbundled: three regions, up^T, gate^T, down, each [neurons, hidden] in chunks of ``chunk_neurons`` rows: a
  neuron costs one read per region.

Every chunk starts at a multiple of ``ALIGN`` (4 KiB) and is padded to it, so each read is a direct (O_DIRECT)
read of whole chunks.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import HetflowError

ALIGN = 4096   # O_DIRECT's unit on Linux file systems (hetflow.runtime.flash_io.ALIGNMENT)
IMAGE_FILE = "flash.bin"          # in an artifact: the image...
MANIFEST_FILE = "flash.json"      # ...and its manifest: {"image", "layers": FlashImage, "weights": {name: [layer, role]}}
FORMAT = "hetflow-flash-image"
VERSION = 1


class FlashError(HetflowError, ValueError):
    """A flash image that does not match its manifest, a budget too small, a layout that cannot be read."""


def _round_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


@dataclass
class LayerLayout:
    """Where one FFN layer sits in the flash image and how it is laid out."""
    name: str
    hidden: int
    neurons: int
    dtype: str                # numpy dtype name of the stored weights ("float16", "float32")
    gated: bool
    bundled: bool
    chunk_neurons: int
    offset: int = 0           # the layer's first byte in the image
    chunk_bytes: int = 0      # one chunk, padded to ALIGN (a region's chunk when unbundled)

    @property
    def parts(self) -> int:
        return 3 if self.gated else 2

    @property
    def chunks(self) -> int:
        return -(-self.neurons // self.chunk_neurons)

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def bytes(self) -> int:
        return self.chunks * self.chunk_bytes * (1 if self.bundled else self.parts)

    def chunk_offsets(self, chunk: int) -> list[int]:
        """Byte offsets of chunk ``chunk``: one (bundled) or one per region (unbundled: up, [gate], down)."""
        if self.bundled:
            return [self.offset + chunk * self.chunk_bytes]
        region = self.chunks * self.chunk_bytes
        return [self.offset + r * region + chunk * self.chunk_bytes for r in range(self.parts)]


def aligned_chunk_neurons(chunk_neurons: int, hidden: int, dtype, parts: int, neurons: int) -> int:
    """``chunk_neurons`` rounded up so a chunk of bundles (``parts`` x ``hidden`` elements each) fills whole
    ALIGN blocks: then no chunk but the last carries padding, the layer's weights lie in the image as one
    strided array (``image_weights``), and a whole layer is read into a buffer that is its weights."""
    per_neuron = hidden * np.dtype(dtype).itemsize * parts
    step = ALIGN // math.gcd(ALIGN, per_neuron)
    return max(1, min(-(-neurons // step) * step, -(-max(1, chunk_neurons) // step) * step))


def layout(name: str, hidden: int, neurons: int, dtype, gated: bool, bundled: bool, min_chunk: int) -> LayerLayout:
    """A layer's layout with chunks of at least ``min_chunk`` bytes (whole neurons, padded to ALIGN)."""
    itemsize = np.dtype(dtype).itemsize
    per_neuron = hidden * itemsize * ((3 if gated else 2) if bundled else 1)
    chunk_neurons = max(1, min(neurons, math.ceil(min_chunk / per_neuron)))
    return LayerLayout(name, hidden, neurons, np.dtype(dtype).name, gated, bundled, chunk_neurons,
                       chunk_bytes=_round_up(chunk_neurons * per_neuron))


@dataclass
class FlashImage:
    """The manifest of a flash image: its layers' layouts, total size and a digest of its chunks' contents."""
    layers: list[LayerLayout] = field(default_factory=list)
    size: int = 0
    sha256: str = ""

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "size": self.size, "sha256": self.sha256,
                           "layers": [asdict(l) for l in self.layers]}, indent=1)

    @staticmethod
    def from_json(text: str, where: str = "flash manifest") -> "FlashImage":
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT or data.get("version") != VERSION:
                raise FlashError(f"{where}: not a {FORMAT} v{VERSION} manifest")
            return FlashImage([LayerLayout(**l) for l in data["layers"]], int(data["size"]), str(data["sha256"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, FlashError):
                raise
            raise FlashError(f"{where}: malformed ({type(exc).__name__}: {exc})") from None

    def layer(self, name: str) -> LayerLayout:
        for l in self.layers:
            if l.name == name:
                return l
        raise FlashError(f"the flash image has no layer {name!r}")

    def check(self, path: str | Path) -> None:
        """The image file is the size its manifest says (the digest is checked by ``verify``)."""
        path = Path(path)
        if not path.is_file():
            raise FlashError(f"{path}: no flash image there (the manifest lists {len(self.layers)} layers)")
        size = path.stat().st_size
        if size != self.size:
            raise FlashError(f"{path}: {size} bytes, but its manifest says {self.size}: not the image this "
                             "manifest was written for")

    def verify(self, path: str | Path) -> None:
        """Size and SHA-256 of the whole image against the manifest (reads it once)."""
        import hashlib
        self.check(path)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        if digest.hexdigest() != self.sha256:
            raise FlashError(f"{path}: its contents do not match the manifest's SHA-256 (tampered with or "
                             "written by another compile)")


def image_weights(path: str | Path, image: FlashImage) -> dict[str, dict[str, np.ndarray]]:
    """Each layer's weights as read-only views of the image file (``np.memmap``: nothing is read until used):
    {layer: {"up": [hidden, neurons], "down": [neurons, hidden], "gate"?}}. Needs chunks without inner padding
    (``aligned_chunk_neurons``), which the tile_flash pass's layouts have."""
    image.check(path)
    out = {}
    for lay in image.layers:
        dtype = np.dtype(lay.dtype)
        per = lay.chunk_neurons * lay.hidden * dtype.itemsize * (lay.parts if lay.bundled else 1)
        if per != lay.chunk_bytes and lay.chunks > 1:
            raise FlashError(f"layer {lay.name}: its chunks of {lay.chunk_neurons} neurons are padded "
                             f"({per} bytes in {lay.chunk_bytes}): its weights are not one array in the image")
        if lay.bundled:
            rows = np.memmap(path, dtype, "r", lay.offset, (lay.neurons, lay.parts, lay.hidden))
            parts = [rows[:, p] for p in range(lay.parts)]
        else:
            region = lay.chunks * lay.chunk_bytes
            parts = [np.memmap(path, dtype, "r", lay.offset + r * region, (lay.neurons, lay.hidden))
                     for r in range(lay.parts)]
        names = ["up", "gate", "down"] if lay.gated else ["up", "down"]
        weights = dict(zip(names, parts))
        weights["up"] = weights["up"].T
        if lay.gated:
            weights["gate"] = weights["gate"].T
        out[lay.name] = weights
    return out


def write_image(path: str | Path, layers: list[tuple[LayerLayout, dict]]) -> FlashImage:
    """Write ``layers`` (layout, {"up": [hidden, neurons], "down": [neurons, hidden], "gate"?}) to ``path``
    in their layouts; returns the manifest. Refuses when the file system has no room."""
    import hashlib
    import os
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    offset = 0
    for lay, _ in layers:
        lay.offset = offset
        offset += lay.bytes
    free = os.statvfs(path.parent).f_bavail * os.statvfs(path.parent).f_frsize
    if offset > free:
        raise FlashError(f"{path.parent}: the flash image needs {offset} bytes and the file system has {free} free")
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for lay, weights in layers:
            dtype = np.dtype(lay.dtype)
            rows = [np.ascontiguousarray(weights["up"].T, dtype)]
            if lay.gated:
                rows.append(np.ascontiguousarray(weights["gate"].T, dtype))
            rows.append(np.ascontiguousarray(weights["down"], dtype))
            for r in rows:
                if r.shape != (lay.neurons, lay.hidden):
                    raise FlashError(f"layer {lay.name}: a weight is {r.shape}, the layout says "
                                     f"{(lay.neurons, lay.hidden)}")
            regions = [np.stack(rows, axis=1)] if lay.bundled else rows   # [neurons, parts, hidden] or [neurons, hidden]
            for region in regions:
                for c in range(lay.chunks):
                    block = region[c * lay.chunk_neurons:(c + 1) * lay.chunk_neurons].tobytes()
                    block += b"\0" * (lay.chunk_bytes - len(block))
                    digest.update(block)
                    f.write(block)
    image = FlashImage([lay for lay, _ in layers], offset, digest.hexdigest())
    image.check(path)
    return image


# --- prediction -------------------------------------------------------------------------------------------

@dataclass
class Predictor:
    """Which neurons of a ReLU FFN fire, from a rank-``rank`` approximation of the up projection:
    ``x @ left @ right + bias > -margin`` (left [hidden, rank], right [rank, neurons])."""
    left: np.ndarray
    right: np.ndarray
    bias: np.ndarray
    margin: float = 0.0

    @property
    def nbytes(self) -> int:
        return self.left.nbytes + self.right.nbytes + self.bias.nbytes

    def active(self, x: np.ndarray) -> np.ndarray:
        """Indices of the neurons predicted active for any row of ``x`` [tokens, hidden]."""
        scores = (x.astype(np.float32) @ self.left) @ self.right + self.bias
        return np.flatnonzero((scores > -self.margin).any(axis=0))


def build_predictor(up: np.ndarray, bias: np.ndarray, rank: int, samples: np.ndarray | None = None,
                    target_recall: float = 0.95, data_aware: bool = False) -> tuple[Predictor, dict]:
    """A rank-``rank`` approximation of the up projection ``up`` [hidden, neurons].

    The truncated SVD of ``up``; with ``data_aware`` and ``samples`` (FFN inputs seen at compile time,
    [n, hidden]), instead the inputs' top ``rank`` principal directions P and ``x @ P @ (P^T @ up)`` (exact
    for inputs in their span; it overfits when the samples are few). With ``samples``, the margin is raised
    until the recall of the truly active neurons on them reaches ``target_recall``. Returns the predictor and what was measured on the samples (recall,
    predicted and truly active fractions, the margin)."""
    up32 = up.astype(np.float32)
    if data_aware and samples is not None and len(samples) >= 2:
        x = samples.astype(np.float32)
        _, _, basis = np.linalg.svd(x, full_matrices=False)          # rows: the inputs' principal directions
        rank = max(1, min(rank, basis.shape[0]))
        left = np.ascontiguousarray(basis[:rank].T)                   # [hidden, rank]
        right = np.ascontiguousarray(left.T @ up32)                    # [rank, neurons]
    else:
        u, sv, vt = np.linalg.svd(up32, full_matrices=False)
        rank = max(1, min(rank, len(sv)))
        left, right = np.ascontiguousarray(u[:, :rank] * sv[:rank]), np.ascontiguousarray(vt[:rank])
    predictor = Predictor(left, right, bias.astype(np.float32))
    stats = {"rank": rank}
    if samples is not None and len(samples):
        true = (samples.astype(np.float32) @ up32 + bias) > 0
        scores = (samples.astype(np.float32) @ predictor.left) @ predictor.right + bias
        active_scores = scores[true]
        if active_scores.size:
            # the margin that keeps ``target_recall`` of the truly active neurons: a quantile of their scores
            predictor.margin = float(max(0.0, -np.quantile(active_scores, 1 - target_recall)))
        predicted = scores > -predictor.margin
        stats.update(recall=float((predicted & true).sum() / max(true.sum(), 1)),
                     predicted_fraction=float(predicted.mean()), active_fraction=float(true.mean()),
                     margin=predictor.margin)
    return predictor, stats
