"""Backend ``flash``: a feed-forward layer whose weights stream from the flash image (a ``hetflow.flash_ffn``
node, made by the tile_flash pass; always a partition of its own).

Its program (``<device>/partN.flash.json``) says which layer of the image it reads, how (bundled, chunk size)
and in which mode (whole layer, exact; or the predicted neurons through a window cache); the runtime's
``flash`` runner (``hetflow.runtime.runners.flash``) reads the bundles with the reader pool (O_DIRECT) while it
prefetches the next streamed layer. The program is a deterministic function of the partition's graph, so the
runtime regenerates it at load and refuses a stored one that differs.

``write_flash_image`` writes the image itself beside the artifact's other files: ``flash.bin`` (the layers'
bundles) and ``flash.json`` (its manifest, with each streamed weight's layer and role). Those weights are then
left out of ``weights.safetensors``: in the loaded graph they are read-only maps of the image.
"""
from __future__ import annotations

import json
from pathlib import Path

from hetflow.ir import Graph
from hetflow.ir.flash_image import ALIGN, IMAGE_FILE, MANIFEST_FILE, LayerLayout, write_image
from hetflow.ir.ops import FLASH_FFN_OP, flash_ffn_weights

from .cpu import BackendError

PROGRAM_FORMAT = "hetflow-flash-program"
STREAMED_ROLES = ("up", "gate", "down")


def flash_nodes(graph: Graph) -> list:
    return [n for n in graph.nodes if n.op == FLASH_FFN_OP]


def layer_layout(node) -> LayerLayout:
    """The layout of the node's layer in the image (its offset set when the image is written)."""
    roles = flash_ffn_weights(node)
    up = node.inputs[roles["up"]].type
    hidden, neurons = (int(d) for d in up.shape)
    gated, bundled = bool(node.attrs.get("gated")), bool(node.attrs.get("bundled", 1))
    chunk = int(node.attrs["chunk_neurons"])
    itemsize = up.dtype.numpy.itemsize
    per_chunk = chunk * hidden * itemsize * ((3 if gated else 2) if bundled else 1)
    return LayerLayout(str(node.attrs["layer"]), hidden, neurons, up.dtype.numpy.name, gated, bundled, chunk,
                       chunk_bytes=-(-per_chunk // ALIGN) * ALIGN)


def flash_program(graph: Graph, name: str = "", device=None) -> str:
    """The program of a flash partition: its one flash_ffn node's layer, layout and mode, and its operands."""
    nodes = flash_nodes(graph)
    if len(nodes) != 1 or len(graph.nodes) != 1:
        raise BackendError(f"flash partition {name}: holds {len(graph.nodes)} nodes; a flash partition is one "
                           f"{FLASH_FFN_OP} node")
    node = nodes[0]
    lay = layer_layout(node)
    roles = flash_ffn_weights(node)
    program = {"format": PROGRAM_FORMAT, "version": 1, "layer": lay.name, "hidden": lay.hidden,
               "neurons": lay.neurons, "dtype": lay.dtype, "gated": lay.gated, "bundled": lay.bundled,
               "chunk_neurons": lay.chunk_neurons, "chunk_bytes": lay.chunk_bytes,
               "activation": node.attrs.get("activation", "relu"), "mode": node.attrs.get("mode", "dense"),
               "window": int(node.attrs.get("window", 0)), "capacity": int(node.attrs.get("capacity", 0)),
               "margin": float(node.attrs.get("margin", 0.0)),
               "operands": {role: node.inputs[i].name for role, i in roles.items()},
               "output": node.outputs[0].name}
    return json.dumps(program, indent=1, sort_keys=True)


def write_flash_image(graph: Graph, directory: Path) -> tuple[list[Path], set[str]]:
    """Write ``flash.bin`` and ``flash.json`` for the graph's flash_ffn nodes (nothing when it has none):
    returns the files to list in the manifest (the manifest only: the image is checked by its own digest, not
    read whole at load) and the weights the image holds."""
    nodes = flash_nodes(graph)
    if not nodes:
        return [], set()
    layers, held = [], {}
    for node in nodes:
        roles = flash_ffn_weights(node)
        lay = layer_layout(node)
        weights = {}
        for role in STREAMED_ROLES:
            if role in roles:
                value = node.inputs[roles[role]]
                if not value.is_weight:
                    raise BackendError(f"{node.describe()}: its {role} weight %{value.name} is not a constant")
                weights[role] = value.data
                held[value.name] = [lay.name, role]
        layers.append((lay, weights))
    image = write_image(Path(directory) / IMAGE_FILE, layers)
    manifest = {"image": IMAGE_FILE, "layers": json.loads(image.to_json()), "weights": held}
    path = Path(directory) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return [path], set(held)
