"""Hugging Face Space entry point: the app of `tinysr demo` (tinysr_diffusers/demo.py), nothing of its own.

Spaces run `python app.py` with GRADIO_SERVER_NAME=0.0.0.0 and GRADIO_SERVER_PORT=7860, which `tinysr demo` uses as
its defaults. Its options can follow (`python app.py --model org/name --max-pixels 65536`); a Space variable
TINYSR_MODEL, if set, is passed as `--model`.
"""

import os
import sys

from tinysr_diffusers.demo import main


if __name__ == "__main__":
    argv = sys.argv[1:]
    if os.environ.get("TINYSR_MODEL") and "--model" not in argv:
        argv = ["--model", os.environ["TINYSR_MODEL"], *argv]
    sys.exit(main(argv))
