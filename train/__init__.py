"""Training and evaluation for any timm model (the project's BFT zoo or timm's own).

``python -m train`` trains (see :mod:`train.args` for the options and the paper's recipes),
``python -m train.evaluate`` evaluates a checkpoint. Both run under ``torchrun`` for several GPUs
or nodes. The library (``butterfly``) never imports this package.
"""


def error_message(err: Exception) -> str:
    """The message of ``err``; for an error raised in a data loader process, its original message
    (the last line) instead of the worker's traceback."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text
