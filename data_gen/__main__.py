"""`python -m data_gen --config R.yaml` (offline generator) or `python -m data_gen teacher --config R.yaml`."""

import sys

from train.hardware import configure_process

from .generate import EmptySplitError, OutputDirError
from .leakage import LeakageError
from .recipe import RecipeError
from .spec import SpecError
from .user_jsonl import BadRowError


def run(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "teacher":
        from .teacher import RequestFailed, main

        errors = (RecipeError, SpecError, BadRowError, LeakageError, OutputDirError, EmptySplitError, RequestFailed)
        argv = argv[1:]
    else:
        from .generate import main

        errors = (RecipeError, SpecError, BadRowError, LeakageError, OutputDirError, EmptySplitError)
    try:
        main(argv)
    except errors as e:
        # Input errors already name the file, key or row: a traceback would only bury that.
        raise SystemExit(f"data_gen: error: {e}") from None


def main():
    """The command: set the process up (before anything imports torch: train/hardware.py), then `run`."""
    configure_process()
    run()


if __name__ == "__main__":
    main()
