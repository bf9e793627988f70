"""The policy, staged like a compiler: read and validated with every problem at file:line,
compiled into typed rules (load -> validate, validate_match -> types), the pure evaluator
that turns event facts into verdicts (engine; sshargs and sshconfig/sshsyntax for what
ssh requests, identity for what a program's content says, cpu for the windows), the one
place that turns a policy and the agents' matchers into the kernel's tables
(kernel_tables), and replay of recordings.

Pure: no I/O but reading the policy file, no kernel, no process, no clock of its own. It
never imports sessions, enforce, observe or service (a unit test checks).
"""
