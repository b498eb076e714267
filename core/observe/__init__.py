"""What a run shows: metrics, the timeline, routing traces and their statistics, offline replay."""
