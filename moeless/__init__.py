"""moeless: serverless experts for Mixture-of-Experts serving.

Importing moeless registers "moeless" in Hugging Face transformers' ExpertsInterface when transformers (v5) is
installed, so `from_pretrained(..., experts_implementation="moeless")` runs moeless's kernels.
"""
__version__ = "0.1.0"

try:  # the Hugging Face extra is optional
    from moeless import hf as _hf

    _hf.register()
except ImportError:  # transformers not installed, or too old to have the ExpertsInterface
    pass
