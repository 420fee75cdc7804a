"""Training and evaluation for any timm model (the project's BFT zoo or timm's own).

``python -m train`` trains (see :mod:`train.args` for the options and the paper's recipes),
``python -m train.evaluate`` evaluates a checkpoint. Both run under ``torchrun`` for several GPUs
or nodes. The library (``butterfly``) never imports this package.
"""
