"""Sinks that only report: the log and the audit log (jsonlog, auditlog), every counter
(metrics) and the Prometheus families read at scrape time (collector) behind a bounded
server (exporter), pushed kill alerts (alerts, alertspool, delivery, notifier), and how
events look to people and programs (output).

Never decides and never acts: nothing here kills a process, changes a session or writes a
kernel map, and nothing here imports enforce (a unit test checks). A sink that fails (full
disk, receiver down) is counted and retried, never allowed to stop the event loop.
"""
