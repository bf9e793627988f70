"""The `agentwatch` command line and `agentwatch top`.

Parses arguments, calls the other packages, and turns every AgentwatchError into one
sentence and an exit code. Text an agent chose reaches the terminal only escaped. It
holds no monitor state of its own.
"""
