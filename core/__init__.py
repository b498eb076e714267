"""klotski_tier.core"""
