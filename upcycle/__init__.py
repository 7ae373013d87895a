"""upcycle: turn a dense causal LM into a native transformers Mixture-of-Experts checkpoint.

The Python API (upcycle/api.py; docs/api.md) is one function per command:

    from upcycle import convert, verify, inspect, routing, train, push

`convert` and `train` are also the names of subpackages: those two packages are callable and call the API
function (`upcycle.convert.pipeline` still imports as before).
"""

from importlib.metadata import PackageNotFoundError, version

from . import convert, train
from .api import convert as _convert
from .api import inspect, make_callable, push, routing, verify
from .api import train as _train
from .convert.spec import ConvertSpec, build_spec
from .errors import UpcycleError
from .train.spec import TrainSpec, build_train_spec

make_callable(convert, _convert)
make_callable(train, _train)

try:
    __version__ = version("upcycle")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "ConvertSpec",
    "TrainSpec",
    "UpcycleError",
    "__version__",
    "build_spec",
    "build_train_spec",
    "convert",
    "inspect",
    "push",
    "routing",
    "train",
    "verify",
]
