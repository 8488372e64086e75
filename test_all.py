"""
Every test of AudioChat-mini, in one file, in the order of the lecture:
the toy world, the tokenizers, the model, the loss and samplers, training, chat, evaluation.

    python test_all.py            # runs everything on a CPU in a few minutes, ends "N passed, M failed"
    python test_all.py codec bpe  # only the tests whose name contains one of these words
    python -m pytest test_all.py  # the same tests under pytest

Each test is a plain function with plain asserts: it checks a known answer, an equivalence
(backends, caches), a property (of a metric, of an edit), or that a command really runs.
No test is timed: speed is measured by `python eval.py --bench`, never asserted here.
"""
import os
import sys
import time
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "2")  # the suite is sized for a 2-core machine
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
TMP = tempfile.mkdtemp(prefix="audiochat_test_")  # scratch space shared by the tests of one run


# -----------------------------------------------------------------------------
# runner: plain python, no pytest needed

def main(filters):
    tests = [(name, fn) for name, fn in globals().items() if name.startswith("test_") and callable(fn)]
    if filters:
        tests = [(n, f) for n, f in tests if any(word in n for word in filters)]
    passed, failed = 0, []
    t_all = time.time()
    for name, fn in tests:
        t0 = time.time()
        torch.manual_seed(0)
        np.random.seed(0)
        try:
            fn()
            passed += 1
            print(f"PASS {name} ({time.time() - t0:.1f}s)", flush=True)
        except Exception as e:  # a failing test must not stop the others
            import traceback
            traceback.print_exc()
            failed.append(name)
            print(f"FAIL {name} ({time.time() - t0:.1f}s): {type(e).__name__}: {e}", flush=True)
    print(f"\ntotal {time.time() - t_all:.0f}s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    print(f"{passed} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
