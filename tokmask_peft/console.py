"""What a ``tokmask`` command prints: our progress, results and warnings, and third-party errors.

Every command used to print routine third-party notices as well. These are now kept off the console:
- transformers' LOAD REPORT naming the classification head MISSING. The head is new by design: it is
  trained and saved with the adapter.
- weight-loading, GGUF and shard-writing progress bars.
- bitsandbytes' note that the optional ``kernels`` package for its CPU 4-bit GEMM is absent, and ``kernels``'
  own note that offline it skips the publisher trust check of the kernel it loads. peft
  imports bitsandbytes on ``import peft`` (``peft/helpers.py``), so that import cannot wait for QLoRA.
- FutureWarnings and other warnings raised inside the libraries.

:func:`quiet` keeps them off the console; errors still show, and ``--verbose`` brings them back.
:func:`quiet_for_library` is the same policy for Python users, applied once when ``tokmask_peft`` first
loads its training or inference stack: it leaves Python's warning display alone (a user's own warnings
still show) and only filters the libraries'; ``TOKMASK_VERBOSE=1`` or a logging setup of the user's own
turns it off.
:func:`kept_in` writes them to the run's ``third_party.log`` while it trains. Our own warnings are
:class:`TokmaskWarning` and always reach the console.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Iterator

THIRD_PARTY = ("transformers", "peft", "accelerate", "bitsandbytes", "kernels", "huggingface_hub", "torch",
               "tokmask.warnings")
THIRD_PARTY_LOG = "third_party.log"
CONSOLE_HANDLER = "tokmask.console"
_WARNINGS = logging.getLogger("tokmask.warnings")  # third-party Python warnings, routed as log records


class TokmaskWarning(UserWarning):
    """A warning of ours: something the user should know (an unfinished run, replaced bytes)."""


def quiet(verbose: bool = False) -> None:
    """Third-party log records and warnings reach the console only at ERROR; with ``verbose``, what the
    libraries print by default (warnings, progress bars) shows too."""
    _third_party_console(logging.WARNING if verbose else logging.ERROR, quiet_bars=not verbose)
    quiet_for_library.done = True  # the command's choice stands
    warnings.showwarning = _show_warning
    warnings.simplefilter("default")  # each warning once per place, as Python's default


LIBRARY_WARNINGS = r"(transformers|peft|accelerate|bitsandbytes|kernels|huggingface_hub|torch)(\.|$)"
"""Modules whose Python warnings :func:`quiet_for_library` keeps off the console."""


def quiet_for_library() -> None:
    """The CLI's quiet for ``from tokmask_peft import ...`` users, applied once: third-party notices off the
    console (errors still show; a run's ``third_party.log`` still gets them), their warnings filtered, a
    user's own warnings untouched. Not where the user set logging up (root handlers) or ``TOKMASK_VERBOSE``."""
    import os

    if os.environ.get("TOKMASK_VERBOSE") or logging.getLogger().handlers or getattr(quiet_for_library, "done", 0):
        return
    quiet_for_library.done = True
    _third_party_console(logging.ERROR, quiet_bars=True)
    warnings.filterwarnings("ignore", module=LIBRARY_WARNINGS)


def _third_party_console(level: int, quiet_bars: bool) -> None:
    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging

    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    console.name = CONSOLE_HANDLER
    transformers_logging.disable_default_handler()  # its stderr handler passes warnings; ours decides
    for name in THIRD_PARTY:
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        for old in [h for h in logger.handlers if h.name == CONSOLE_HANDLER]:  # called again: replace
            logger.removeHandler(old)
        logger.addHandler(console)
        logger.propagate = False
    if quiet_bars:
        transformers_logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, TokmaskWarning):
        print(f"tokmask: warning: {message}", file=sys.stderr)
    else:
        _WARNINGS.warning("%s:%s: %s: %s", filename, lineno, category.__name__, message)


@contextlib.contextmanager
def kept_in(folder: str | Path) -> Iterator[None]:
    """Third-party warnings (and above) of the block also go to ``folder/third_party.log``."""
    log = Path(folder) / THIRD_PARTY_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    # Opened on the first notice: a run refused before it starts leaves no file behind (and so no folder).
    handler = logging.FileHandler(log, encoding="utf-8", delay=True)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(levelname)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in THIRD_PARTY]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
        log.touch()  # a finished block always holds one, so every run has the same set of files
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()
