"""greencode.decoding"""
