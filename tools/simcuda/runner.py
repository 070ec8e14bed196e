#!/usr/bin/env python3
"""The interpreter side of tools/simcuda (the stand-in libcuda): one long-lived process per
program, so that each PTX module is parsed once. Reads job file paths (kernels/ptx_sim.py's job
format), one per line, from stdin; runs each; answers `ok` or `err <message>` on one line of
stdout. Whatever the interpreter prints goes to stderr. Standard library only."""

import contextlib
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "kernels"))
import ptx_sim  # noqa: E402


def main():
    out = sys.stdout
    devnull = open(os.devnull, "w")
    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        try:
            sink = sys.stderr if os.environ.get("VISTOK_SIMCUDA_TRACE") == "1" else devnull
            with contextlib.redirect_stdout(sink):
                ptx_sim.run_job(path)
            reply = "ok"
        except ptx_sim.SimError as e:
            reply = f"err {e}"
        except Exception as e:  # a bug of the interpreter: say where
            traceback.print_exc(file=sys.stderr)
            reply = f"err interpreter crashed: {e!r}"
        out.write(reply.replace("\n", " ") + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
