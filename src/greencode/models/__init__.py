"""greencode.models"""
