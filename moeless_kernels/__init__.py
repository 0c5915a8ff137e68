"""moeless_kernels: the data plane's ops for one MoE layer, each a Triton kernel plus a pure-torch reference.

Never imports from `moeless`; holds no policy and nothing distributed. See docs/ARCHITECTURE.md.
"""
