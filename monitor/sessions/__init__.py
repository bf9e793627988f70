"""Agent sessions in userspace: the tracker's state machine, the /proc reader, and
completing what the probes saw only in part.

Knows which process belongs to which agent session and what it did. It never decides
policy and never signals a process.
"""
