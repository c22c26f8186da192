"""`python -m eval [--config X.yaml]` runs the eval recipe; `python -m eval mcq ...` scores a multiple-choice
file; `python -m eval aggregate ...` merges several runs (seeds) into one report."""

import sys

from train.hardware import configure_process


def main():
    # OpenMP threads that spin at barriers stall every op when the CPU is shared; libgomp reads the wait policy
    # once, at torch import, so it is chosen before anything imports torch (see train/hardware.py).
    configure_process()
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command == "mcq":
        from eval.mcq import main as mcq_main

        mcq_main(sys.argv[2:])
    elif command == "aggregate":
        from eval.aggregate import main as aggregate_main

        aggregate_main(sys.argv[2:])
    else:
        from eval.run import main as run_main
        from train.recipe import RecipeError

        try:
            run_main(sys.argv[1:])
        except RecipeError as e:  # a recipe check that needs the files (eval/config.py: check_paths): no traceback
            raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
