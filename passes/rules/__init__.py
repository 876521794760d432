"""Rewrite rules of the catalogue, one module per rule family, each a RuleSet:

    IDENTITY    eliminate-identity, eliminate-dropout      (identity.py)
    CONV_BN     fold-conv-bn                               (conv_bn.py)
    MATMUL_ADD  fuse-matmul-add                            (matmul_add.py)
    CANONICALIZE = IDENTITY + CONV_BN + MATMUL_ADD
    NOOP        eliminate-noop-reshape, -transpose, -cast, -expand, -pad, -slice,
                -concat, eliminate-unsqueeze-squeeze       (noop.py)
    BN_MATMUL   fold-gemm-bn, fold-matmul-bn               (bn_matmul.py)
    SUM_ADD     sum-to-add                                 (sum_add.py)
    CONV_AFFINE fold-conv-mul, fold-conv-add               (conv_affine.py)
    FOLD = CANONICALIZE + NOOP + BN_MATMUL + SUM_ADD + CONV_AFFINE   (the `fold` pass's rules)

Each module's docstring states its algebra and numbers the cases it rewrites and the
ones it leaves alone.
"""
from qcompile.rewrite import RuleSet

from .conv_bn import CONV_BN, FOLD_CONV_BN
from .identity import ELIMINATE_DROPOUT, ELIMINATE_IDENTITY, IDENTITY
from .matmul_add import FUSE_MATMUL_ADD, MATMUL_ADD

CANONICALIZE = RuleSet("canonicalize", IDENTITY + CONV_BN + MATMUL_ADD)

from .bn_matmul import BN_MATMUL, FOLD_GEMM_BN, FOLD_MATMUL_BN  # noqa: E402
from .conv_affine import CONV_AFFINE, FOLD_CONV_ADD, FOLD_CONV_MUL  # noqa: E402
from .noop import NOOP  # noqa: E402
from .sum_add import SUM_ADD, SUM_TO_ADD  # noqa: E402

FOLD = RuleSet("fold", CANONICALIZE + NOOP + BN_MATMUL + SUM_ADD + CONV_AFFINE)

__all__ = [
    "CANONICALIZE", "CONV_BN", "ELIMINATE_DROPOUT", "ELIMINATE_IDENTITY", "FOLD_CONV_BN", "FUSE_MATMUL_ADD",
    "IDENTITY", "MATMUL_ADD",
    "BN_MATMUL", "CONV_AFFINE", "FOLD", "FOLD_CONV_ADD", "FOLD_CONV_MUL", "FOLD_GEMM_BN", "FOLD_MATMUL_BN", "NOOP", "SUM_ADD", "SUM_TO_ADD",
]
