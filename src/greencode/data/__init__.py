"""greencode.data"""
