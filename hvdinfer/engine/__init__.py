"""The job engine every batch task runs on: chunks scheduled over ranks, a durable journal,
ordered assembly and resume, and the stuck-rank watchdog (see each module's docstring)."""
