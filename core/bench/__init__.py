"""Measuring this machine into a profile: the drive, compute, and compute beside the drive."""
