"""Run pytest and refuse the "no tests collected" exit code (5): an empty run is a failure, never a pass."""

import subprocess
import sys

code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *sys.argv[1:]])
if code == 5:
    print("error: pytest collected no tests; the suite is broken, not green", file=sys.stderr)
    sys.exit(1)
sys.exit(code)
