"""The monitor's configuration, staged like a compiler: read a file through a trusted path
(safefile) as bounded YAML with line numbers (yamlcompose, yamlsource), validate it with
every problem at file:line and build typed settings (validate, validate_agents -> types),
all driven by load. Agent specs themselves are monitor.model.agents.

Also owns the readers the policy shares (trusted file, bounded YAML, linear-time regex).
It never starts anything, never reads /proc and never touches the kernel: loading a bad
file raises one ConfigError and changes nothing that runs.
"""
