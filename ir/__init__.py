"""r1c IR: types, values/ops/functions/modules, op registry, printer, parser, verifier, reference interpreter."""

from r1c.ir.core import DimList, Function, Module, Op, Param, Value
from r1c.ir.interpreter import init_weights, random_inputs, run
from r1c.ir.parser import IRParseError, parse_module
from r1c.ir.printer import print_module
from r1c.ir.types import DType, TensorType, tensor
from r1c.ir.verifier import VerifyError, verify

__all__ = [
    "DType",
    "DimList",
    "Function",
    "IRParseError",
    "Module",
    "Op",
    "Param",
    "TensorType",
    "Value",
    "VerifyError",
    "init_weights",
    "parse_module",
    "print_module",
    "random_inputs",
    "run",
    "tensor",
    "verify",
]
