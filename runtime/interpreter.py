"""The reference interpreter lives with the IR (``hetflow.ir.interpreter``): the executable spec belongs with
the op table it runs. Re-exported here, where the runtime's users look for it."""
from hetflow.ir.interpreter import ExecutionError, InputError, Interpreter, check_inputs

__all__ = ["ExecutionError", "InputError", "Interpreter", "check_inputs"]
