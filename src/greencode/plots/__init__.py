"""greencode.plots"""
