"""klotski_tier.tiers"""
