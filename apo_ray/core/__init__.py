"""Pure math and tables of the method: arms, losses, policy objectives, metrics. No I/O, no Ray."""
