"""The policy: rules read, validated and compiled (rules), the pure evaluator that turns
event facts into verdicts (engine, sshargs), the one place that turns a policy into the
kernel's rule tables (kernel_tables), and replay of recordings.

Pure: no I/O but reading the policy file, no kernel, no process, no clock of its own. It
never imports sessions, enforce, observe or service (a unit test checks).
"""
