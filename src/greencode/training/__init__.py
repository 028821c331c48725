"""greencode.training"""
