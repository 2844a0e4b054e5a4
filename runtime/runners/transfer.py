"""Runner ``transfer``: a copy between two memories that are not one unified space."""
from __future__ import annotations

from . import register_runner


class TransferRunner:
    host_inputs = False

    def __init__(self, input_names: list[str], output_names: list[str], copy_into):
        self.pairs = list(zip(input_names, output_names))
        self.copy_into = copy_into

    def run(self, inputs: dict, outputs: dict) -> None:
        for source, destination in self.pairs:
            self.copy_into(outputs[destination], inputs[source])

    def run_dynamic(self, inputs: dict) -> dict:
        return {destination: inputs[source] for source, destination in self.pairs}


@register_runner("transfer")
def load_transfer(part, executor):
    return TransferRunner(part.input_names, part.output_names, executor.copy_into)
