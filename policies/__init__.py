"""klotski_tier.policies"""
