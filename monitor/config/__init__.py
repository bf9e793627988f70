"""The monitor's configuration, staged like a compiler: read a file through a trusted path
(safefile) as bounded YAML with line numbers (yamlcompose, yamlsource), validate it with
every problem at file:line, build typed settings and compiled agent matchers.

Also owns the readers the policy shares (trusted file, bounded YAML, linear-time regex).
It never starts anything, never reads /proc and never touches the kernel: loading a bad
file raises one ConfigError and changes nothing that runs.
"""
