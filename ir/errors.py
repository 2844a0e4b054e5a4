"""The base of every error hetflow raises for bad user input or a failed stage.

The CLI turns a ``HetflowError`` into one clear line and a non-zero exit; anything
else is a bug in hetflow and keeps its traceback.
"""


class HetflowError(Exception):
    pass
