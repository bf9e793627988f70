"""The kernel side: checking the host, compiling and loading the BPF probes, reading their
ring buffers and writing their maps, pinning links so enforcement outlives the monitor.

The only package that imports BCC. It moves bytes between the kernel and typed Python
values and never decides policy, never judges an event and never signals a process.
"""
