"""The shared vocabulary: what every stage of the monitor talks about.

Owns the typed events the kernel reports and the enums and limits they are made of
(events), what became of a verdict (outcome), the records the control socket speaks
(records), what an agent is and how a process is recognised as one (agents), addresses
folded, shown and parsed one way (address), the one way bytes from a process become text
and a name becomes a comm (cmdline), how a dynamic loader reads its command line
(ldso), the one way agent text is shown safely (safetext),
and errors with their file:line locations (errors). Every other package imports from
here; this package imports nothing else of the monitor (tests/unit/test_layers.py walks
the imports), never touches the kernel, a file, a socket or a process, and holds no state.
"""
