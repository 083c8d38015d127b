"""eecompile.serve.launcher: what ``eecompile serve`` adds around MLServer (here: how refusals are logged).

The checks run in a fresh interpreter: MLServer and tritonclient's gRPC module register the same protobuf
messages (``inference.ServerLiveRequest``), so importing ``mlserver`` here would break the stock-client tests
that share this process.
"""

from __future__ import annotations

import subprocess
import sys

CHECK = r'''
import logging
from mlserver.errors import InferenceError, MLServerError
from eecompile.serve.launcher import OneLineRefusals

def record(error):
    try:
        raise error
    except Exception as exc:
        info = (type(exc), exc, exc.__traceback__)
    return logging.LogRecord("mlserver.grpc", logging.ERROR, "check", 1, str(error), (), info)

refusal = record(InferenceError("unknown input 'input_idz'"))
assert OneLineRefusals().filter(refusal)
assert refusal.levelno == logging.WARNING and refusal.exc_info is None
assert logging.Formatter().format(refusal) == "refused a request (400): unknown input 'input_idz'"
for fault in (MLServerError("kernel failed", status_code=500), RuntimeError("boom")):
    kept = record(fault)
    assert OneLineRefusals().filter(kept)
    assert kept.levelno == logging.ERROR and kept.exc_info is not None
    assert "Traceback" in logging.Formatter().format(kept)
print("ok")
'''


def test_refusals_are_one_warning_line_and_faults_keep_their_traceback(serve_extra):
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
