"""agentwatch: watch AI agents' process trees through eBPF, export what they do, enforce policy.

Importing the package does nothing but define the version; BCC is only imported by the loader.
"""

__version__ = "0.1.0"
