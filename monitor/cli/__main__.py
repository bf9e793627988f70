"""`python -m monitor.cli`: the same as the `agentwatch` command."""

import sys

from monitor.cli.main import main

sys.exit(main())
