"""What the scripts that run Triton kernels under the CPU interpreter (``TRITON_INTERPRET=1``) share."""

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter


def widen_bfloat16_in_dots():
    """Make the interpreter's tl.dot read bfloat16 tiles as numbers (exactly, as float32).

    Triton 3.9's interpreter stores bfloat16 as uint16 and multiplies those raw bits in tl.dot.
    """
    interpreted_dot = interpreter.InterpreterBuilder.create_dot

    def widen(tile):
        if tile.dtype != tl.bfloat16:
            return tile
        return interpreter.TensorHandle((tile.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, accumulator, *options):
        return interpreted_dot(self, widen(a), widen(b), accumulator, *options)

    interpreter.InterpreterBuilder.create_dot = create_dot


def round_bfloat16_casts_to_nearest():
    """Make the interpreter's float32 -> bfloat16 casts round to nearest even, as the GPU's (and torch's) do.

    Triton 3.9's interpreter chops the low bits instead, doubling the rounding error.
    """
    interpreted_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, source, destination_type):
        if source.dtype.scalar == tl.float32 and destination_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(source.data).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return interpreted_cast(self, source, destination_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl  # the casting builders call it through self
