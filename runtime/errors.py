"""The runtime's errors."""
from hetflow.ir.errors import HetflowError


class RuntimeFailure(HetflowError):
    """A run (or loading what runs) failed; the message names the partition."""


class RunnerError(RuntimeFailure):
    """A partition's runner cannot be built or cannot run it."""
