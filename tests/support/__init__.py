"""What the tests share, written once: typed fakes of the monitor's collaborators (kernel
maps, enforcer, clock, log), builders of events and ring-buffer records, and writers of
/proc fixture trees.

Import as `from tests.support.NAME import ...` (pyproject puts the repository root on
pytest's path). The fakes are checked by mypy against the Protocols they stand in for
(`make lint`), so a fake that drifts from the real interface fails the build, not a test
run later. Nothing here needs root or the kernel.
"""
