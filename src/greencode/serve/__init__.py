"""greencode.serve"""
