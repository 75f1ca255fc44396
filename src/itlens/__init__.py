"""itlens: a closer look at what instruction tuning does to a language model.

The package follows the data flow of the study (Ghosh et al., ICML 2024):
world -> pretrain -> tune -> generate -> analysis (shift, knowledge, copying, borrowing) -> judge
-> study -> report. Each stage is one module with a typed config and a function; the CLI is a thin
layer over them.
"""

__version__ = "0.1.0"

from itlens.errors import InputError  # noqa: E402

__all__ = ["InputError", "__version__"]
