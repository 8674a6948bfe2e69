"""The hook implementations of the ``lycoris`` plugin (the module the ``mindone_lora`` entry point names).

Importing it is cheap: MindSpore is imported only when a layer is built.
"""

from __future__ import annotations

from mindone_lora_lycoris.loha import LohaAlgorithm
from mindone_lora_lycoris.lokr import LokrAlgorithm
from mindone_lora_plugin.hookspecs import hookimpl


@hookimpl
def mindone_lora_algorithms():
    yield LohaAlgorithm()
    yield LokrAlgorithm()


@hookimpl
def mindone_lora_add_arguments(parser):
    parser.add_argument("--lokr_factor", type=int, default=-1,
                        help="lokr: the Kronecker factor of each dimension (LyCORIS's factor; -1 = as square as "
                             "possible)")
    parser.add_argument("--lokr_decompose_both", action="store_true",
                        help="lokr: also decompose the small factor w1 into w1_a @ w1_b (LyCORIS's decompose_both)")
    parser.add_argument("--lokr_full_matrix", action="store_true",
                        help="lokr: store both factors full (LyCORIS's full_matrix; the scale is then 1)")
