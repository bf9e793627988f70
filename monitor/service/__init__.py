"""The daemon: the event loop that runs kernel -> decoder -> sessions -> judge -> enforcer
and sinks, the root-only control socket, systemd's notify protocol, and installing the unit.

Wires the other packages together and owns their lifetime. It holds no policy logic and
never signals a process except through enforce.
"""
