"""Triton jit code of the kernels, one file per op family; the host wrappers live one level up.

Importing a module here decorates its kernels with `triton.jit`, which reads TRITON_INTERPRET at that moment,
so the host wrappers import these modules lazily, on the first Triton call. Nothing here touches
`triton.runtime.driver`, allocates memory or validates arguments: the wrappers do that.
"""
