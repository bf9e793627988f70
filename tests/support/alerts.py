"""What the alert tests share: the alert notify() accepted, typed."""

from __future__ import annotations

from monitor.observe.alerts import Alert


def accepted(alert: Alert | None) -> Alert:
    """The alert Notifier.notify() took; None would mean it refused one, which a started or
    unstarted notifier with a spool never does."""
    assert alert is not None, "notify() refused an alert"
    return alert
