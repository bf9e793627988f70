"""Agent sessions in userspace: the tracker's state machine, the /proc reader, completing
what the probes saw only in part, taking in exec and pending-candidate records (intake),
adopting what already runs and agreeing with the kernel's process map (adoption), the
agent table, recognition and `agentwatch exec` registration (registry), and rebuilding
sessions from pinned probes (recovery); and what an agent's exec runs (issue 12): the
program behind a dynamic loader (loader), what its file is (identity, with the host
binaries the policy names in hostbins), the forwards its ssh config files request
(sshconfig), each read inside the process's own root (rootfs), said at most once per
period (throttle).

Knows which process belongs to which agent session and what it did. It never decides
policy and never signals a process: what it finds running goes to the judge, a latched
agent's session to the kill switch, both as callables the daemon hands in.
"""
