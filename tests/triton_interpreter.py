"""Run a test module's kernel comparisons in Triton's interpreter on CPU, for the tests of the Triton kernels.

TRITON_INTERPRET=1 must be set before Triton compiles anything, so the comparisons run in a subprocess that imports
the test module afresh: ``[module.compare(*case) for case in module.CASES]``, returned through JSON (each result a
dict of plain numbers / booleans).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def compare_interpreted(module: str, timeout: int) -> list:
    """``compare(*case)`` for every case in ``CASES`` of the test module ``module`` (its name, e.g.
    "test_lsh_hashing"), run with Triton's interpreter in one subprocess (``timeout`` seconds)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import {module} as T; "
            "print(json.dumps([T.compare(*c) for c in T.CASES]))")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
