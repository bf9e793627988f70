"""The kernel side: the ABI shared with the probes and its decoder (abi), checking the host
(host), compiling, loading and attaching the BPF probes and reading their ring buffers
(loader), reading and writing their maps (mapio), pinning links so enforcement outlives the
monitor (pinning), and the running kernel's BTF offsets (btf).

The only package that imports BCC. It moves bytes between the kernel and typed Python
values and never decides policy, never judges an event and never signals a process.
"""
