"""Runner ``simulated``: devices this machine lacks (NPU, PIM, a modelled GPU) run their partition on the
reference interpreter until their simulators land: the outputs are real, the times the modelled ones.
Also the stated fallback of the other runners."""
from __future__ import annotations

import numpy as np

from hetflow.ir.interpreter import Interpreter

from . import register_runner


class HostRunner:
    """A runner that computes its outputs with NumPy on the host (the interpreter, the device simulators):
    ``run`` is ``run_dynamic`` copied into the arena's slots."""
    host_inputs = True

    def __init__(self, output_names: list[str], copy_into=None):
        self.output_names = output_names
        self.copy_into = copy_into or (lambda destination, value: np.copyto(destination, value, casting="unsafe"))

    def run_dynamic(self, inputs: dict) -> dict:
        raise NotImplementedError

    def run(self, inputs: dict, outputs: dict) -> None:
        results = self.run_dynamic(inputs)  # every result first: one may be a view of an input
        for name in self.output_names:
            self.copy_into(outputs[name], results[name])


class SimulatorRunner(HostRunner):
    """A device simulator's runner: its outputs computed, its time modelled (``last_seconds``)."""

    def __init__(self, simulator, output_names: list[str], copy_into=None):
        super().__init__(output_names, copy_into)
        self.simulator = simulator

    @property
    def last_seconds(self) -> float | None:
        return self.simulator.last_seconds


class InterpreterRunner(HostRunner):
    def __init__(self, interpreter: Interpreter, output_names: list[str], copy_into=None):
        super().__init__(output_names, copy_into)
        self.interpreter = interpreter

    def run_dynamic(self, inputs: dict) -> dict:
        return dict(zip(self.output_names, self.interpreter.run(inputs)))


@register_runner("simulated")
def load_simulated(part, executor):
    return InterpreterRunner(Interpreter(part.graph), part.output_names, executor.copy_into)
