"""Rewrite rules of the catalogue, one module per rule family, each a RuleSet:

    IDENTITY    eliminate-identity, eliminate-dropout      (identity.py)
    CONV_BN     fold-conv-bn                               (conv_bn.py)
    MATMUL_ADD  fuse-matmul-add                            (matmul_add.py)
    CANONICALIZE = IDENTITY + CONV_BN + MATMUL_ADD

Each module's docstring states its algebra and numbers the cases it rewrites and the
ones it leaves alone.
"""
from qcompile.rewrite import RuleSet

from .conv_bn import CONV_BN, FOLD_CONV_BN
from .identity import ELIMINATE_DROPOUT, ELIMINATE_IDENTITY, IDENTITY
from .matmul_add import FUSE_MATMUL_ADD, MATMUL_ADD

CANONICALIZE = RuleSet("canonicalize", IDENTITY + CONV_BN + MATMUL_ADD)

__all__ = [
    "CANONICALIZE", "CONV_BN", "ELIMINATE_DROPOUT", "ELIMINATE_IDENTITY", "FOLD_CONV_BN", "FUSE_MATMUL_ADD",
    "IDENTITY", "MATMUL_ADD",
]
