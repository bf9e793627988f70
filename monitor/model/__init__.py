"""The shared vocabulary: what every stage of the monitor talks about.

Owns the typed events the kernel reports, errors with their file:line locations, the one
way bytes from a process become text (cmdline), the one way agent text is shown safely
(safetext), and what an agent is and how a process is recognised as one (agents). Every
other package imports from here; this package imports nothing else of the monitor (a
unit test walks the imports), never touches the kernel, a file, a socket or a process,
and holds no state.
"""
