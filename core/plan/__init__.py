"""Machine models, the cost model, the planner and the simulator."""
