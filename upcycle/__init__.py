"""upcycle: turn a dense causal LM into a native transformers Mixture-of-Experts checkpoint."""

from importlib.metadata import PackageNotFoundError, version

from .convert.spec import ConvertSpec, build_spec
from .errors import UpcycleError

try:
    __version__ = version("upcycle")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["ConvertSpec", "UpcycleError", "__version__", "build_spec"]
