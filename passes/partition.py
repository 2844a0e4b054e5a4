"""Partitions of a placed graph (``hetflow.ir.program``): the planner reasons about the order they run in."""
from hetflow.ir.program import TRANSFER_OP, device_runs

__all__ = ["TRANSFER_OP", "device_runs"]
