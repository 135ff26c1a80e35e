"""Stand-in for the `torch` package in the ModelOpt benchmark venv (installed there as torch/__init__.py).

ModelOpt 0.47's ONNX AutoCast imports torch at module level (modelopt/onnx/quantization/qdq_utils.py) but its
fp16/bf16 conversion never calls it; polygraphy only checks `isinstance(x, torch.Tensor)`. The torch wheel with
its CUDA dependencies is several gigabytes, so the venv gets this module instead. Any real use raises.
"""


class _Missing:
    def __init__(self, name):
        self._n = name

    def __getattr__(self, a):
        return _Missing(self._n + "." + a)

    def __call__(self, *a, **k):
        raise RuntimeError(f"torch stand-in: {self._n} is not available")


class Tensor:  # nothing is ever a torch tensor here
    pass


def __getattr__(name):
    return _Missing("torch." + name)


__version__ = "2.8.0"
