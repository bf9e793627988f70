"""Acting on verdicts: the judge applies the policy to what sessions did and decides (a
Decision per verdict), the executor carries each decision out through the enforcer, and
the reporter logs, counts (in observe's MetricsState) and alerts what came of it. The
enforcer kills race-free and only within the guard rails (never pid 1, a kernel thread,
the monitor, a process outside an agent session, a recycled pid). The operator's kill
switch (killswitch) kills through the same enforcer.

The enforcer is the only code that signals a process. Nothing here matches rules itself
(that is the policy engine's job), and nothing here keeps a counter (observe does).
"""
