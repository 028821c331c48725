"""greencode.eval"""
