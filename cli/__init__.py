"""klotski_tier.cli"""
