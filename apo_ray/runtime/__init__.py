"""How a run executes: in one process or on Ray (pools, learner group, driver actor), and the start-up
shared by the entry points."""
