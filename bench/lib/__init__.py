"""What the benchmark scripts in bench/ share: the harness that runs the monitor from a fixed
copy of the sources (harness), the load generator and the host's other load (load), the
machine description (machine), and bench/run.py's parts (tools, auditd, overhead,
throughput, report). Importable as `lib` by a script in bench/ (its folder is on sys.path).

Nothing here runs on import; a benchmark is started only by a script's main().
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # tests.support (free_port, stop_process) is shared with the tests
    sys.path.append(_ROOT)
