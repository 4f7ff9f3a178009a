"""Pipeline runtime: schedules, simulator, transports and the executor."""
