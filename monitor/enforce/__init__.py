"""Acting on verdicts: the judge applies the policy to what sessions did, the enforcer
kills, race-free and only within the guard rails (never pid 1, a kernel thread, the
monitor, a process outside an agent session, a recycled pid).

The enforcer is the only code that signals a process. Nothing here matches rules itself
(that is the policy engine's job).
"""
