"""The daemon: the event loop that runs kernel -> decoder -> sessions -> judge -> enforcer
and sinks (daemon), the queue other threads hand it work through (inbox), putting a config
and policy in force (reload), what it reports (status), the root-only control socket
(control, its wire format in wire, its client in client), systemd's notify protocol
(sdnotify), and installing the unit (install).

Wires the other packages together and owns their lifetime. It holds no policy logic and
never signals a process except through enforce.
"""
