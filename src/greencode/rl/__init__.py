"""greencode.rl"""
